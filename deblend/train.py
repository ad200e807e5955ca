"""CLI: train one stage of a run.

    python -m deblend.train stage1 --config C --data D --run R   VAE: noisy isolated -> clean
    python -m deblend.train stage2 --run R                       encoder on blends, frozen decoder
    python -m deblend.train flow --run R                         latent prior (stage1 latents)
    python -m deblend.train amortize --run R                     encoder -> flow-MAP latents
                                                                 (with training.amortized_map)
    python -m deblend.train stage3 --run R                       regressor on mu -> (e1, e2)

Later stages take the config and dataset recorded in R/run.json unless --config/--data are
given. A stage whose results exist refuses to start without --resume (continue from its last
finished epoch) or --force (train it again from scratch). Under
``torchrun --nproc_per_node N -m deblend.train STAGE --run-dir R ...`` the stage runs with DDP
(there ``--run`` must be spelt ``--run-dir``: torchrun takes ``--run`` for its ``--run-path``).
What each stage trains is declared in :mod:`training.stages`; the run directory's layout and
checkpoint format are described in :mod:`deblend.core.runs`.
"""

from __future__ import annotations

import argparse
import sys

from deblend.core.cli import fail_cleanly
from deblend.core.config import load_config
from training.runner import run_stage
from training.stages import STAGES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deblend.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--run", "--run-dir", dest="run", required=True,
                        help="run directory (spell it --run-dir under torchrun, whose own "
                             "parser mistakes --run for its --run-path)")
    parser.add_argument("--config", help="YAML config (default: the run's, or the embedded one)")
    parser.add_argument("--data", help="dataset directory (default: the run's)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the stage from its last finished epoch")
    mode.add_argument("--force", action="store_true",
                      help="train the stage again from scratch, replacing its results")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps "
                                         "(overrides training.device)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


@fail_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.config) if args.config else None
    try:
        run_stage(args.stage, args.run, data_dir=args.data, config=config, resume=args.resume,
                  force=args.force, device=args.device, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"interrupted: continue with `python -m deblend.train {args.stage} --run "
              f"{args.run} --resume`", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
