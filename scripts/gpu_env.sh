# Shared by the scripts/gpu_*.sh device scripts (source it): what every results log starts with, and keeping a
# carried GGUF half on the machine for the next call.

# write_env LOG: date, the GPUs and the package versions, into LOG (replaced)
write_env() {
  {
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
  } > "$1" 2>&1
}

# keep_gguf_parts: a carried SmolLM2 GGUF half (.model/smol.gguf.part.*) to /tmp/gguf, where scripts/gpu_quality.sh
# joins the halves (one call carries at most 64 MiB)
keep_gguf_parts() {
  if ls .model/smol.gguf.part.* >/dev/null 2>&1; then mkdir -p /tmp/gguf && cp .model/smol.gguf.part.* /tmp/gguf/; fi
}

# install_bnb LOG: install a carried bitsandbytes wheel (.whl/bitsandbytes-*.whl; the GPU image has none) and say
# in LOG which version imports
install_bnb() {
  local whl
  whl=$(ls .whl/bitsandbytes-*.whl 2>/dev/null | head -n 1)
  if [ -n "$whl" ]; then
    python -m pip install -q --no-deps --no-index "$whl" >> "$1" 2>&1
  fi
  python -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" >> "$1" 2>&1
}

# begin_run NAME: what every device script starts with: out=$OUT/NAME (created), log=$out/run.log with the
# environment header, the repository importable
begin_run() {
  out="${OUT:-/tmp/out}/$1"
  mkdir -p "$out"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  log="$out/run.log"
  write_env "$log"
}
