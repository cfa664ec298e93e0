"""The command line's defaults that both the parser's help and the commands read."""

DREAMS_FOLDER = "dreams"  # where `dream` without --out saves (a new folder inside, named after the objective)
DEMO_SCAN_TOKENS = 30_000  # the demo: corpus tokens scanned for the examples it starts from and is compared with
MODE_SCAN_TOKENS = 100_000  # `dream --modes`: corpus tokens scanned for the top examples later modes start from
EXAMPLE_SCAN_TOKENS = 100_000  # `dream --from-examples`: corpus tokens scanned for the examples the dream starts from
