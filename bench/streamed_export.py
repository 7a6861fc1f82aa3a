"""Peak memory of the streamed export of a sharded checkpoint against the in-memory export.

A random-weight Llama of about 670 MB (float32: 8 layers of width 1024, a 32,000-token
vocabulary) is saved in shards of ``--shard`` (default 100MB); each export then runs in a fresh
process, which reads its resident memory once its imports are done (``VmRSS``), resets the
kernel's peak (``/proc/self/clear_refs``) and reads the peak (``VmHWM``) when the export ends:
the work's memory is the difference. Both exports' tensors are compared byte for byte. Linux
only.

    python bench/streamed_export.py [--shard 100MB]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch
import transformers as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny import tiny_tokenizer

CHILD = textwrap.dedent(
    """
    import json, sys, time
    import torch
    from refdir.directions.direction import Direction
    from refdir.interventions.export import export_orthogonalized
    from refdir.interventions.streamed import stream_orthogonalized
    from refdir.model.loading import load_model
    from refdir.model.options import ModelOptions

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    mode, source, out = sys.argv[1:4]
    torch.manual_seed(0)
    direction = Direction(torch.randn(1024), 4, -1, "bench")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from here, after the imports
    floor = status("VmRSS")
    start = time.perf_counter()
    if mode == "memory":
        export_orthogonalized(load_model(source), direction, out)
    else:
        stream_orthogonalized(ModelOptions(model=source), direction, out)
    seconds = time.perf_counter() - start
    print(json.dumps({"floor": floor, "peak": status("VmHWM"), "seconds": seconds}))
    """
)


TENSOR = 32000 * 1024 * 4
"""The largest tensor's bytes: the embedding (and the read-out), float32."""


def _model() -> T.PreTrainedModel:
    torch.manual_seed(0)
    config = T.LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    return T.LlamaForCausalLM(config)


def _run(mode: str, source: Path, out: Path) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(source), str(out)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _tensors(folder: Path) -> dict[str, bytes]:
    from safetensors import safe_open

    found: dict[str, bytes] = {}
    for path in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            names = f.keys()
            for name in names:
                found[name] = f.get_tensor(name).contiguous().view(torch.uint8).numpy().tobytes()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shard", default="100MB", help="save_pretrained's max_shard_size")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "sharded"
        model = _model()
        model.save_pretrained(source, max_shard_size=args.shard)
        tiny_tokenizer().save_pretrained(source)
        del model
        shards = sorted(source.glob("*.safetensors"))
        largest = max(p.stat().st_size for p in shards)
        total = sum(p.stat().st_size for p in shards)
        print(
            f"checkpoint: {total / 1e6:.0f} MB in {len(shards)} shards, largest {largest / 1e6:.0f} MB"
        )
        memory = _run("memory", source, Path(tmp) / "memory")
        streamed = _run("streamed", source, Path(tmp) / "streamed")
        same = _tensors(Path(tmp) / "memory") == _tensors(Path(tmp) / "streamed")
        print(f"{'export':10s} {'imports MB':>11s} {'peak MB':>8s} {'work MB':>8s} {'seconds':>8s}")
        for name, r in (("in-memory", memory), ("streamed", streamed)):
            work = (r["peak"] - r["floor"]) / 1e6
            print(
                f"{name:10s} {r['floor'] / 1e6:11.0f} {r['peak'] / 1e6:8.0f} {work:8.0f} "
                f"{r['seconds']:8.1f}"
            )
        work_memory = memory["peak"] - memory["floor"]
        work_streamed = streamed["peak"] - streamed["floor"]
        print(f"work memory, streamed / in-memory: {work_streamed / work_memory:.2f}")
        print(f"work memory, streamed / largest shard: {work_streamed / largest:.2f}")
        print(f"work memory, streamed / largest tensor: {work_streamed / TENSOR:.2f}")
        print(f"work memory, in-memory / checkpoint: {work_memory / total:.2f}")
        print(f"tensors byte for byte equal: {same}")


if __name__ == "__main__":
    main()
