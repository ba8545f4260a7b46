#!/usr/bin/env python
"""Case-study figures from a predictions CSV written by `main.py eval`.

Three studies of one finding (--label, default Effusion), each shown as the film, a Grad-CAM
overlay of that finding and the model's probabilities for every label:

  case_clean_pa.png   a PA study with the finding present that the model calls positive (p >= 0.5),
                      the one with the highest probability;
  case_corrupted.png  the same study after Gaussian blur (severity 3) and JPEG (severity 3), the
                      model re-run on each, with the confidence drop;
  case_ap_miss.png    an AP study with the finding present that the model misses (p < 0.5), the
                      one with the lowest probability.

When no study of a kind exists, the nearest one is used, said on stdout and in the figure title
("nearest case: ..."). case_studies.json lists each case. The predictions CSV carries every input
column, so --csv is not needed (accepted so that the suite's common flags work here too).
Research use only; not for clinical use.
"""
from __future__ import annotations

import argparse
import sys

from tools.cli import common_parser, guarded, model_options, run_options
from tools.errors import UserError

PROG = "make_case_studies.py"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, parents=[common_parser("outputs/case_studies")],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cases = parser.add_argument_group("case studies")
    cases.add_argument("--preds", required=True,
                       help="predictions_<split>.csv written by main.py eval (input columns, <L>_logit, <L>_prob)")
    cases.add_argument("--label", default="Effusion", help="the finding the cases are chosen for and explained")
    return parser


def make_case_studies(args) -> dict:
    from tools.model_files import ModelRequest, load_audited_model
    from tools.runtime import start_run
    from tools.stages.case_studies import CaseOptions, case_studies
    from tools.table import header

    run = start_run(**run_options(args, PROG))
    model, info = load_audited_model(run, ModelRequest(**model_options(args)), args.labels, header(args.preds),
                                     args.compile)
    if not info.has_features:
        raise UserError(f"--weights {args.weights}: Grad-CAM needs the penultimate features, which a TorchScript "
                        "model does not expose; case studies need a DenseNet-121 layout")
    opts = CaseOptions(preds=args.preds, labels=info.labels, label=args.label, image_size=info.image_size,
                       img_root=args.img_root, weights=args.weights)
    return case_studies(run, model, opts)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(PROG, make_case_studies, args, args.outdir)


if __name__ == "__main__":
    sys.exit(main())
