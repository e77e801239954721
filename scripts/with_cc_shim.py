"""Run an eet subcommand with TensorRT-RTX plans deserialized through the test shim (GPU machines whose compute
capability TensorRT-RTX does not list, such as the H100). Tests and benchmarks only; the product never loads it.

    EET_CC_SHIM=/path/to/cc-shim python scripts/with_cc_shim.py bench DIR [options]
    (subcommands: check, run, bench, warm)
"""
import importlib
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the source checkout
    sys.path.insert(0, os.environ["EET_CC_SHIM"])
    import cc_shim  # noqa: E402

    cc_shim.load()  # before anything initializes CUDA
    command, argv = sys.argv[1], sys.argv[2:]
    if command not in ("check", "run", "bench", "warm"):
        sys.exit(f"usage: {sys.argv[0]} check|run|bench|warm DIR [options]")
    module = importlib.import_module(f"eet.commands.{command}")
    sys.exit(module.main(argv, deserialize_hook=cc_shim.faked_capability))
