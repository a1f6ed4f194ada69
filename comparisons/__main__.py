"""Command line of the comparison harness (placeholder until the harness lands:
``run`` prints the environment report)."""
import sys

from linf_plugin.env import main as env_main

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] not in (["run"], []):
        sys.exit(f"unknown command {args[0]!r}; choose from: run")
    sys.exit(env_main([]))
