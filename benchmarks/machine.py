"""What a benchmark ran on (CPU, GPU, library versions, load) and the device's peak FLOP/s.

Numbers are only comparable on the same machine at the same load, so every result records this.
Imports nothing heavy at module level: the suite must run where TensorFlow or torch is missing.
"""
from __future__ import annotations

import importlib.metadata
import os
import json
import platform
import subprocess
import sys
import time
from typing import Optional

import jax

# Dense peak FLOP/s per device by a substring of jax's device_kind, most specific first.
# Sources: NVIDIA H100 datasheet (SXM5: bf16 989.4 TFLOP/s dense, fp32 66.9 TFLOP/s without
# tensor cores; PCIe: bf16 756.5, fp32 51.2); H200 datasheet (same compute as H100 SXM);
# A100 datasheet (bf16 312, fp32 19.5). float32 uses the non-tensor-core peak: XLA may run f32
# convolutions on TF32 tensor cores (H100 SXM 494.7 TFLOP/s), so f32 MFU can read high.
PEAK_FLOPS = {
    'H100 PCIe': {'bfloat16': 756.5e12, 'float32': 51.2e12},
    'H100': {'bfloat16': 989.4e12, 'float32': 66.9e12},
    'H200': {'bfloat16': 989.4e12, 'float32': 66.9e12},
    'A100': {'bfloat16': 312e12, 'float32': 19.5e12},
}


def peak_flops(device_kind: str, dtype: str, cpu_peak_gflops: float = 0.0) -> Optional[float]:
  """Peak FLOP/s of one device for dtype; None when unknown (CPUs unless given in GFLOP/s)."""
  for name, peaks in PEAK_FLOPS.items():
    if name.lower() in device_kind.lower():
      return peaks.get(dtype)
  if device_kind.lower() == 'cpu' and cpu_peak_gflops > 0:
    return cpu_peak_gflops * 1e9
  return None


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def version(package: str) -> Optional[str]:
  """Installed version, or None (e.g. torch or TensorFlow absent on this machine)."""
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def describe(with_jax: bool = True) -> dict:
  """The machine, library versions and load right now (jax devices only when with_jax)."""
  info = {
      'time': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
      'platform': platform.platform(), 'python': platform.python_version(),
      'cpu_model': cpu_model(), 'cpu_count': os.cpu_count(),
      'loadavg_1m': round(os.getloadavg()[0], 2),
      'versions': {p: version(p) for p in ('jax', 'jaxlib', 'flax', 'optax', 'torch',
                                           'tensorflow-cpu', 'tensorflow')},
      'argv': ' '.join(sys.argv),
  }
  if with_jax:
    devices = jax.devices()
    info.update(backend=jax.default_backend(), device_kind=devices[0].device_kind,
                device_count=len(devices),
                gpus=[d.device_kind for d in devices if d.platform == 'gpu'])
  return info


_PROBE = ('import json, jax; d = jax.devices(); print(json.dumps({"backend": jax.default_backend(), '
          '"device_kind": d[0].device_kind, "device_count": len(d), '
          '"gpus": [x.device_kind for x in d if x.platform == "gpu"]}))')


def probe_devices() -> dict:
  """jax's backend and devices, asked in a child process.

  The suite's parent process never starts a jax backend itself: on a GPU it would hold memory
  (XLA preallocates most of it) that the measured child processes need.
  """
  done = subprocess.run([sys.executable, '-c', _PROBE], capture_output=True, text=True,
                        check=False)
  if done.returncode:
    return {'backend': 'unavailable', 'error': (done.stderr.strip().splitlines() or [''])[-1]}
  return json.loads(done.stdout.strip().splitlines()[-1])
