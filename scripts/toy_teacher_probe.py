"""The toy world's teacher on a saved model: how well the demonstration-conditioned context still works.

SDFT's teacher is the model's in-context ability; in the toy world training on one task can destroy it
(docs/toy_world.md, "Why SDFT stops learning after the first task"). For a skill's test inputs this
prints the teacher context's greedy accuracy (exact, plain style) and the probability it gives the end
of the answer right after the correct answer and one letter early.

    python scripts/toy_teacher_probe.py ~/.cache/sdft_cli/models/toy-world-<hash> mirror
    python scripts/toy_teacher_probe.py runs/toy_world/<run>/t01_drop/train/model mirror
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdft_cli.prompts import encode_messages, teacher_messages
from sdft_cli.toy import world


def probe(model_dir: str, skill: str, n: int = 64, max_len: int = 32) -> dict:
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False).eval()
    end = tok.eos_token_id
    p_right = p_early = correct = 0.0
    rows = world.rows(skill, "test", n, style="spaced")
    with torch.no_grad():
        for row in rows:
            answer = world.SKILLS[skill](row["prompt"].split(":", 1)[1])
            ctx = encode_messages(
                tok, teacher_messages(row["prompt"], row["demonstration"], world.TEMPLATE, None)
            )
            ids = tok(answer, add_special_tokens=False)["input_ids"]
            probs = model(input_ids=torch.tensor([ctx + ids + [end]])).logits[0, len(ctx) - 1 :].softmax(-1)
            p_right += float(probs[len(ids), end])
            p_early += float(probs[len(ids) - 1, end])
            out = model.generate(
                torch.tensor([ctx]),
                max_new_tokens=max_len,
                do_sample=False,
                eos_token_id=end,
                pad_token_id=end,
            )[0, len(ctx) :].tolist()
            correct += tok.decode([t for t in out if t != end]) == answer
    k = len(rows)
    return {"teacher_acc": correct / k, "p_end_after_answer": p_right / k, "p_end_one_early": p_early / k}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("skill", choices=sorted(world.SKILLS))
    ap.add_argument("-n", type=int, default=64, help="test inputs")
    args = ap.parse_args()
    r = probe(args.model_dir, args.skill, args.n)
    print(
        f"{args.skill}: teacher greedy accuracy {100 * r['teacher_acc']:.1f}% | "
        f"P(end) after the answer {r['p_end_after_answer']:.4f} | one letter early {r['p_end_one_early']:.4f}"
    )


if __name__ == "__main__":
    main()
