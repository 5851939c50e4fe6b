"""Comparing two oracle dumps (oracle.py's --compare): rows matched by id, the per-token
log-prob differences and the other fields both dumps have, and a pass / fail at a tolerance.
Needs only numpy: a dump from another library is compared without loading a model.
"""
import math

import numpy as np

from files import read_jsonl

TOP_K = 5
RATIO_BANDS = (0.1, 0.2)  # the fraction of tokens whose exp(diff) leaves [1 - b, 1 + b] is reported


def row_sequences(row):
    """(name, sequence record) of a dump row: the row itself, or its chosen and rejected."""
    if "logprobs" in row:
        return [("", row)]
    return [(k, row[k]) for k in ("chosen", "rejected") if isinstance(row.get(k), dict)]


def compare(ours, theirs, tol):
    """Mismatch statistics of dump rows `theirs` against `ours` (matched by id) as printable lines,
    and whether every check is within `tol`: per-token |diff| max, the DPO loss, equal token ids,
    no missing rows. `ours`, `theirs`: lists of rows."""
    a, b = {r["id"]: r for r in ours}, {r["id"]: r for r in theirs}
    diffs, sums, losses, top1, top5, worst, bad_ids, proc = [], [], [], [], [], [], [], []
    tempered, entropy = [], []
    for rid in (k for k in a if k in b):
        for (name, x), (_, y) in zip(row_sequences(a[rid]), row_sequences(b[rid])):
            label = f"{rid}{'/' + name if name else ''}"
            if x["token_ids"] != y.get("token_ids"):
                bad_ids.append(label)
                continue
            d = np.asarray(y["logprobs"], dtype=np.float64) - np.asarray(x["logprobs"], dtype=np.float64)
            diffs.append(d)
            worst.append((float(np.abs(d).max()), label, int(np.abs(d).argmax())))
            sums.append(abs(d.sum()))
            if "top5_ids" in x and "top5_ids" in y:
                top1 += [p[0] == q[0] for p, q in zip(x["top5_ids"], y["top5_ids"])]
                top5 += [len(set(p) & set(q)) / TOP_K for p, q in zip(x["top5_ids"], y["top5_ids"])]
            for key, found in (("tempered_logprobs", tempered), ("entropy", entropy)):
                if key in x and key in y:
                    found += [abs(p - q) for p, q in zip(x[key], y[key])]
            if "processed_logprobs" in x and "processed_logprobs" in y:
                proc += [abs(p - q) if p is not None and q is not None else (0.0 if p == q else math.inf)
                         for p, q in zip(x["processed_logprobs"], y["processed_logprobs"])]
        if "loss" in a[rid] and "loss" in b[rid]:
            losses.append((abs(b[rid]["loss"] - a[rid]["loss"]), rid))
    missing = sorted(set(a) ^ set(b))
    lines = [f"rows: {len(set(a) & set(b))} matched, {len(missing)} in only one dump"
             + (f" (e.g. {missing[:5]})" if missing else "")]
    ok = not missing and not bad_ids
    if bad_ids:
        lines.append(f"different token ids in {len(bad_ids)} sequence(s), not compared: {bad_ids[:5]}")
    if diffs:
        d = np.abs(np.concatenate(diffs))
        lines.append(f"per-token |diff| over {d.size} tokens: mean {d.mean():.3g}, "
                     f"p95 {np.percentile(d, 95):.3g}, max {d.max():.3g} (tol {tol:g})")
        ratio = np.exp(np.concatenate(diffs))
        lines.append("tokens with exp(diff) outside " + ", ".join(
            f"[{1 - r:g}, {1 + r:g}]: {np.mean((ratio < 1 - r) | (ratio > 1 + r)):.4f}" for r in RATIO_BANDS))
        lines.append(f"sequence-sum |diff|: mean {np.mean(sums):.3g}, max {np.max(sums):.3g}")
        ok &= bool(d.max() <= tol)
    if top1:
        lines.append(f"top-1 agreement {np.mean(top1):.4f}, top-5 overlap {np.mean(top5):.4f}")
    if tempered:
        lines.append(f"tempered log-probs |diff|: max {max(tempered):.3g}; entropy |diff|: max "
                     f"{max(entropy) if entropy else float('nan'):.3g}")
    if proc:
        lines.append(f"processed log-probs |diff|: max {max(proc):.3g} (inf: a token in one nucleus only)")
    if losses:
        m, rid = max(losses)
        lines.append(f"DPO loss |diff| over {len(losses)} pairs: max {m:.3g} (row {rid})")
        ok &= m <= tol
    worst.sort(reverse=True)
    if worst:
        lines.append("worst rows: " + ", ".join(f"{lab} ({m:.3g} at token {i})" for m, lab, i in worst[:5]))
    return lines, ok


def read_dump(path):
    """A dump's rows; a row without an id, or a sequence without token_ids and logprobs (lists of
    equal length): an error naming the file, line and field."""
    rows = []
    for n, r in read_jsonl(path):
        if "id" not in r or not row_sequences(r):
            raise ValueError(f"{path}:{n}: missing field '{'logprobs' if 'id' in r else 'id'}'")
        for name, x in row_sequences(r):
            ids, lps = x.get("token_ids"), x.get("logprobs")
            if not isinstance(ids, list) or not isinstance(lps, list) or len(ids) != len(lps):
                raise ValueError(f"{path}:{n}: field '{name + '.' if name else ''}logprobs' must be a list "
                                 "as long as its token_ids")
        rows.append({**r, "id": str(r["id"])})
    return rows
