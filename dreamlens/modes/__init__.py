"""Modes: several distinct dreams of one objective, for features that respond to unrelated things.

A floor above `optim/` (the optimizers it runs) and `analysis/` (the attribution and activation patterns
that separate modes); neither imports it. `settings.py` holds `ModeSettings` and the checks of the mode
options, `budget.py` the one rule of what separating a mode costs, `keys.py` a mode's key tokens and
their neighbours, `starts.py` where a later mode starts, `search.py` `dream_modes` (dreaming the K
modes) and `result.py` the `Modes` result and its folder. The submodules load on use (no work here).
"""
