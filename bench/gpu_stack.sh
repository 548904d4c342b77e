# The GPU stack of the device benches (vllm 0.20.1, deepspeed 0.19.8, ...; made as bench/device_lora.sh says): an
# xz tar of the unpacked wheels in 58 MiB parts, carried one device call at a time, assembled in /tmp/asm, unpacked
# into /tmp/site (on PYTHONPATH), then the xgrammar wheel. Sourced by bench/device_vl.sh and bench/device_rm.sh.

stack_part() {  # stack_part FILE...: parts carried by this call, put aside for the unpacking
  mkdir -p /tmp/asm && cp "$@" /tmp/asm/ && ls -la /tmp/asm
}

stack_unpack() {  # every part assembled and unpacked into /tmp/site
  mkdir -p /tmp/site
  local t0; t0=$(date +%s)
  if command -v xz >/dev/null; then cat /tmp/asm/part* | xz -dc -T0 | tar x -C /tmp/site
  else cat /tmp/asm/part* | python3 -c "import lzma, sys, tarfile
tarfile.open(fileobj=lzma.open(sys.stdin.buffer), mode='r|').extractall('/tmp/site')"; fi
  echo "unpacked in $(( $(date +%s) - t0 )) s"; du -sh /tmp/site
}

stack_ready() {  # stack_ready [xgrammar]: the stack there (else exit 3), the xgrammar wheel added if asked, versions
  test -d /tmp/site/vllm || { echo "no stack in /tmp/site: the machine was given back between calls"; exit 3; }
  if [ "${1:-}" = xgrammar ]; then
    python3 -c "import glob, zipfile; [zipfile.ZipFile(w).extractall('/tmp/site') for w in glob.glob('.gpu/xg/*.whl')]"
  fi
  test -d /tmp/site/xgrammar || { echo "no xgrammar in /tmp/site: call the xgrammar stage first"; exit 3; }
  python3 -c "import vllm, deepspeed, torch; print('vllm', vllm.__version__, 'deepspeed', deepspeed.__version__, \
'torch', torch.__version__, torch.cuda.get_device_name())"
}
