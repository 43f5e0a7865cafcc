"""Time and peak memory of one DDO training step against one upstream MLE step, side by side in one run.

    python benchmarks/step_cost.py --backend edm2 [backend options...]
    python benchmarks/step_cost.py --backend var  [backend options...]

Each backend lives in its own module (step_cost_edm2.py, step_cost_var.py) with a `main(argv)`;
`--backend NAME --help` lists its options.
"""

import argparse
import importlib
import os
import sys

if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    parser.add_argument('--backend', choices=['edm2', 'var'], required=True)
    args, rest = parser.parse_known_args()
    importlib.import_module(f'step_cost_{args.backend}').main(rest)
