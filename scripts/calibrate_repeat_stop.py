"""How `eval.repeat_stop` would have acted on saved predictions made without it.

    .venv/bin/python scripts/calibrate_repeat_stop.py MODEL_FOLDER PREDICTIONS.jsonl... [--share 0.8]

For each share it counts, with the model's tokenizer: references (legitimate text) that would
trigger the loop stop, answers that ran to their budget (`truncated`) that it would have
stopped, and answers that ended on their own that it would have cut short. Answers the stop
already ended (`looped`, in predictions made with it) are left out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoTokenizer

from fedsdr.generation import loops_within, number_token_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="the model folder (its tokenizer is used)")
    parser.add_argument("predictions", type=Path, nargs="+", help="predictions.jsonl files made without the stop")
    parser.add_argument("--share", type=float, nargs="+", default=[0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--digits-apart", action="store_true",
                        help="tell number tokens apart (the stop before it counted every number as one token)")
    args = parser.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    numbers = frozenset() if args.digits_apart else number_token_ids(tok)
    references: set[str] = set()
    answers: list[tuple[bool, str]] = []
    for path in args.predictions:
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row.get("scorer") == "choice":
                continue
            references.add(row["reference"])
            if row.get("response") is not None and row.get("new_tokens") and not row.get("looped"):
                answers.append((row.get("truncated") == 1.0, row["response"]))
    ref_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in sorted(references)]
    ans_ids = [(cut, tok(t, add_special_tokens=False)["input_ids"]) for cut, t in answers]
    cut_total = sum(cut for cut, _ in ans_ids)
    print(f"{len(ref_ids)} references, {cut_total} answers that hit their budget, "
          f"{len(ans_ids) - cut_total} that ended on their own")
    for share in args.share:
        refs = sum(loops_within(ids, share, numbers) for ids in ref_ids)
        caught = sum(loops_within(ids, share, numbers) for cut, ids in ans_ids if cut)
        shortened = sum(loops_within(ids, share, numbers) for cut, ids in ans_ids if not cut)
        print(f"share {share}: references triggering {refs}, budget-hitting answers stopped {caught}/{cut_total}, "
              f"answers that ended on their own cut short {shortened}/{len(ans_ids) - cut_total}")


if __name__ == "__main__":
    main()
