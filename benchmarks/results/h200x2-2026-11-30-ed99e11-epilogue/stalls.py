import csv, sys, gzip, collections
for path in sys.argv[1:]:
    rows = list(csv.reader(gzip.open(path, "rt")))
    head = rows[1]; data = [r for r in rows[2:] if len(r) >= len(head) - 1]
    col = head.index("Warp Stall Sampling (All Samples)"); src = head.index("Source")
    stall_cols = [i for i, h in enumerate(head) if h.startswith("stall_") and "Not Issued" not in h]
    tot = sum(float(r[col] or 0) for r in data) or 1
    print(f"#### {rows[0][1]}: {len(data)} instructions, {tot:.0f} samples")
    ops = collections.Counter()
    for r in data:
        op = r[src].split()
        ops[(op[0] if not op[0].startswith("@") else op[1]).split(".")[0] if op else "?"] += float(r[col] or 0)
    print("by opcode:", ", ".join(f"{k} {v / tot * 100:.1f}%" for k, v in ops.most_common(16)))
    reasons = collections.Counter()
    for r in data:
        for i in stall_cols: reasons[head[i]] += float(r[i] or 0)
    print("by reason:", ", ".join(f"{k[6:]} {v / tot * 100:.1f}%" for k, v in reasons.most_common(10)))
    for r in sorted(data, key=lambda r: -float(r[col] or 0))[:25]:
        top = max(stall_cols, key=lambda i: float(r[i] or 0))
        print(f"{float(r[col]) / tot * 100:5.1f}%  {r[0][-5:]}  {r[src].strip()[:80]:80s} {head[top][6:]}")
