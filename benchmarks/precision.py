"""How far the fast engines' probabilities are from eager Paddle's, for a trained model.

Decodes the photographs given (files or folders) as ``palm predict`` does, scores them with
eager Paddle (the reference), Paddle Inference + oneDNN fp32 (``palm predict``'s default) and
Paddle Inference + oneDNN bf16 (``--precision bf16``), and prints per engine the largest and
mean |probability - eager's| and how many images change class at the model's threshold.

    python benchmarks/precision.py MODEL_DIR PHOTOS... [--batch 16]
"""

from __future__ import annotations

import argparse

import palm  # noqa: F401  (thread settings before paddle loads)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="models/ or models_export/ of a trained model")
    ap.add_argument("paths", nargs="+", help="photographs or folders of them")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args(argv)

    import numpy as np

    from palm.data.image import to_chw_float
    from palm.nn.modelinfo import input_size
    from palm.serve.decode import decode_stream
    from palm.serve.inference import load_engine
    from palm.serve.predict import find_images

    files = find_images(args.paths)
    ref_engine, info = load_engine(args.model, device="cpu", engine="eager")
    images = [
        d.image for d in decode_stream(files, int(info["image_size"]), input_size(info), workers=0) if d.error is None
    ]
    x = to_chw_float(np.stack(images))
    threshold = float(info.get("threshold", 0.5))

    def score(engine):
        return np.concatenate([engine(x[i : i + args.batch]) for i in range(0, len(x), args.batch)])

    ref = score(ref_engine)
    print(
        f"{info['model']} ({args.model}), {len(x)} photographs, threshold {threshold}; "
        f"eager probabilities in [{ref.min():.4f}, {ref.max():.4f}], {int((ref >= threshold).sum())} PM"
    )
    print("| engine | max abs(p - eager) | mean abs(p - eager) | class changes |")
    print("|---|---|---|---|")
    for precision in ("fp32", "bf16"):
        engine, _ = load_engine(args.model, device="cpu", engine="paddle-inference", precision=precision)
        p = score(engine)
        d = np.abs(p - ref)
        flips = int(((p >= threshold) != (ref >= threshold)).sum())
        print(f"| {engine.name} | {d.max():.2e} | {d.mean():.2e} | {flips} of {len(p)} |")


if __name__ == "__main__":
    main()
