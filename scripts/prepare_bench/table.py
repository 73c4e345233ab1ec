"""The benchmark's printed summary: a Markdown table per system, the stage breakdown, parts and agreement."""
from __future__ import annotations

from prepare_bench.measure import STAGES


def _fmt(v, spec="{:.1f}") -> str:
    return "-" if v is None else spec.format(v)


def print_table(results: dict) -> None:
    """The summary table (Markdown) and the stage breakdown."""
    head = ("| workload | run | images | faces | s | CPU s | img/s | img/s incl. decode | faces/s | x anchor | x anchor (CPU s) "
            "| peak RSS MiB | peak GPU MiB | GPU util % |")
    args = results["args"]
    print(f"\n{args['stat']} of {args['repeat']} repeat(s); 'x anchor' = anchor seconds / facemill seconds")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, w in results["workloads"].items():
        rows = [("decode (cv2, shared)", w["systems"]["decode"]), ("facemill face stage", w["systems"]["facemill"]),
                ("facemill detect only", w["systems"]["facemill_detect"]),
                ("facenet-pytorch detect", w["systems"]["anchor"])]
        if "ray" in w:
            rows.append(("facemill Ray prepare", {**w["ray"], "seconds": w["ray"]["wall_s"],
                                                  "ratio_vs_anchor": None}))
        an_rate = w["systems"]["anchor"]["img_per_s"]
        for label, s in rows:
            ratio = s.get("ratio_vs_anchor")
            if label == "facemill Ray prepare" and an_rate:
                ratio = s["img_per_s"] / an_rate
            gpu = s.get("gpu") or {}
            print(f"| {name} | {label} | {s['images']} | {_fmt(s.get('faces'), '{}')} | {s['seconds']:.2f} "
                  f"| {_fmt(s.get('cpu_s'), '{:.2f}')} | {_fmt(s['img_per_s'])} | {_fmt(s.get('img_per_s_with_decode'))} "
                  f"| {_fmt(s.get('faces_per_s'))} | {_fmt(ratio, '{:.2f}')} "
                  f"| {_fmt(s.get('ratio_vs_anchor_cpu'), '{:.2f}')} "
                  f"| {_fmt(s.get('peak_rss_mib'), '{:.0f}')} | {_fmt(s.get('peak_gpu_mib'), '{:.0f}')} "
                  f"| {_fmt(gpu.get('util_mean'))} |")
    print()
    print("| workload | " + " | ".join(STAGES) + " | total |")
    print("|" + "---|" * (len(STAGES) + 2))
    for name, w in results["workloads"].items():
        b = w["breakdown_s"]
        total = sum(b.values())
        cells = [f"{b[s]:.2f} s ({100 * b[s] / total:.0f}%)" if total else "-" for s in STAGES]
        print(f"| {name} | " + " | ".join(cells) + f" | {total:.2f} s |")
        c = w["breakdown_cpu_s"]
        print(f"| {name} (CPU s) | " + " | ".join(f"{c[s]:.2f}" for s in STAGES) + f" | {sum(c.values()):.2f} |")
    print()
    for name, w in results["workloads"].items():
        parts = ", ".join(f"{k} {v:.2f}" for k, v in w["breakdown_parts_s"].items())
        print(f"{name} detector parts (s): {parts}")
    print()
    for name, w in results["workloads"].items():
        a = w["agreement"]
        print(f"{name}: anchor faces {a['anchor_faces']}, facemill faces {a['facemill_faces']}, anchor faces "
              f"matched (IoU > {a['iou_threshold']}) {_fmt(a['anchor_matched_fraction'], '{:.3f}')}, facemill "
              f"faces matched {_fmt(a['facemill_matched_fraction'], '{:.3f}')}, mean |box diff| "
              f"{_fmt(a['mean_abs_box_diff_px'], '{:.2f}')} px (signed x1 y1 x2 y2: "
              f"{a['mean_signed_box_diff_px']}); breakdown == process: {w['breakdown_matches_process']}")
    print(f"anchor NMS: {results['anchor_nms']} ({results['anchor_nms_standin_s']:.2f} s in the stand-in); "
          f"peak RSS of the process {results['peak_rss_mib_process']:.0f} MiB")
