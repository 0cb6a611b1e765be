#!/usr/bin/env bash
# Rebuild .whl-lc/ (git-ignored) from scratch: the wheels llm-compressor 0.14.0.1 needs to import and to run
# `oneshot` with AWQ and GPTQ on the GPU machine, whose image has torch, transformers (and their own
# dependencies: huggingface-hub, numpy, tokenizers, safetensors, fsspec, filelock, httpx, pyyaml, tqdm, ...)
# but not these. One device call carries at most 64 MiB, so:
#   - left out, never imported on this path (checked by bench/llmcompressor/verify_min_env.sh):
#     auto-round and its py-cpuinfo (only llmcompressor.modifiers.autoround imports them), pillow (only
#     llmcompressor.modeling.kimi_k3 imports it; transformers treats it as optional);
#   - pyarrow is slimmed (52.5 -> 32.3 MiB): datasets is imported at the top of llmcompressor, and it imports
#     pyarrow, but never Arrow Flight or S3 (pyarrow.fs imports _s3fs inside try/except ImportError), nor the
#     C++ headers/sources/tests; duplicate copies of versioned .so files (the wheel has no symlinks) go too;
#   - pandas' tests go.
# Usage: bench/llmcompressor/pack.sh [OUT_DIR]   (PYVER=3.11 builds the same set for this machine's Python)
set -euo pipefail
root=$(git rev-parse --show-toplevel); cd "$root"
out=${1:-.whl-lc}
pyver=${PYVER:-3.12}
[ "$out" != .whl-lc ] || grep -qx "/.whl-lc/" .gitignore || echo "/.whl-lc/" >> .gitignore
rm -rf "$out"; mkdir -p "$out"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
plat=(--only-binary=:all: --python-version "$pyver" --implementation cp --platform manylinux2014_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
# what `pip install llmcompressor==0.14.0.1 transformers==5.17.0` resolved to (2026-11), minus torch,
# transformers and their dependencies, minus the three left out above
pins=(
  llmcompressor==0.14.0.1 compressed-tensors==0.19.0 accelerate==1.15.0 loguru==0.7.3 nvidia-ml-py==13.615.71
  datasets==5.2.0 pyarrow==26.0.1 pandas==3.1.1 python-dateutil==4.0.0 tzdata==2026.6
  dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
  psutil==7.2.2 requests==2.34.2 urllib3==2.8.0 charset-normalizer==3.5.2
)
python3 -m pip download -q --no-deps "${plat[@]}" -d "$tmp" "${pins[@]}" 2>&1 | grep -v '^WARNING' || true
python3 - "$tmp" "$out" <<'PY'
import base64, glob, hashlib, os, re, sys, zipfile

src, out = sys.argv[1:]
names_in = lambda zi: {i.filename for i in zi.infolist()}

def drop_pyarrow(name, names):
    if re.match(r"pyarrow/(include|src|tests)/", name):
        return True
    if re.match(r"pyarrow/(libarrow_flight|libarrow_python_flight|libarrow_s3)\.so", name):
        return True
    if re.match(r"pyarrow/(_flight|_s3fs|_pyarrow_cpp_tests)\.cpython-.*\.so$", name):
        return True
    # libX.so and libX.so.N.M.K are byte copies of libX.so.N, the soname the extensions link to
    m = re.match(r"(pyarrow/lib\w+\.so)(\.\d+)?(\.\d+\.\d+)?$", name)
    if m and (m.group(2) is None or m.group(3) is not None):
        sonames = [n for n in names if re.fullmatch(re.escape(m.group(1)) + r"\.\d+", n)]
        return bool(sonames)
    return False

def drop_pandas(name, names):
    return name.startswith("pandas/tests/")

RULES = {"pyarrow": drop_pyarrow, "pandas": drop_pandas}

for whl in sorted(glob.glob(os.path.join(src, "*.whl"))):
    base = os.path.basename(whl)
    rule = RULES.get(base.split("-")[0])
    dst = os.path.join(out, base)
    if rule is None:
        os.replace(whl, dst)
        continue
    with zipfile.ZipFile(whl) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zo:
        names = names_in(zi)
        kept = [i for i in zi.infolist() if not rule(i.filename, names)]
        record = next(i.filename for i in kept if i.filename.endswith(".dist-info/RECORD"))
        lines = []
        for i in kept:
            if i.filename == record:
                continue
            data = zi.read(i.filename)
            zo.writestr(i, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            lines.append(f"{i.filename},sha256={digest},{len(data)}")
        lines.append(f"{record},,")
        zo.writestr(record, "\n".join(lines) + "\n")
    print(f"slimmed {base}: {os.path.getsize(whl) / 2**20:.1f} -> {os.path.getsize(dst) / 2**20:.1f} MiB, "
          f"{len(names) - len(kept)} files dropped")
PY
# omegaconf (+ its antlr4 runtime, a wheel built by ../shared/device/pack-wheels.sh) lets the same call import
# llmc_ray, to write the synthetic checkpoint llm-compressor reads (bench/materialize_synthetic.py)
cp .whl/omegaconf-2.3.0-py3-none-any.whl .whl/antlr4_python3_runtime-4.9.3-py3-none-any.whl "$out"/ \
  || echo "no .whl/ omegaconf + antlr4 wheels (run ../shared/device/pack-wheels.sh first): theirs cannot write synthetic models" >&2
total=$(du -cb "$out"/*.whl | tail -1 | cut -f1)
ls -l "$out"
echo "total $((total / 1048576)) MiB in $(ls "$out" | wc -l) wheels"
[ "$total" -lt $((60 * 1048576)) ] || { echo "over 60 MiB" >&2; exit 1; }
