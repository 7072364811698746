"""Huge pages for malloc's large blocks on Linux CPUs: XLA:CPU's per-step buffers, mapped cheaply.

XLA:CPU allocates a step's multi-GB temporary buffer afresh every call; glibc serves it from a
new mmap, and with 4 KiB pages the kernel takes ~1.2M page faults a step to map and zero it
(2-3 s of system time per clfc train step, B=4 192x160, on a 2-core CPU; ~0.3 s with huge
pages). glibc reads its tunables only at process start, so a command-line entry point re-execs
itself with the tunable set. Harmless on GPUs (host allocations only) and on glibc < 2.35
(unknown tunables are ignored). CLFC_HUGE_PAGE_MALLOC=0 opts out.
"""
import os
import sys

HUGE_PAGE_MALLOC = 'glibc.malloc.hugetlb=1'
OPT_OUT_ENV = 'CLFC_HUGE_PAGE_MALLOC'


def huge_page_malloc_env(environ) -> dict:
  """A copy of `environ` whose GLIBC_TUNABLES also has HUGE_PAGE_MALLOC (a user's value kept)."""
  env = dict(environ)
  if env.get(OPT_OUT_ENV, '1') == '0':
    return env
  tunables = [t for t in env.get('GLIBC_TUNABLES', '').split(':') if t]
  if not any(t.startswith('glibc.malloc.hugetlb=') for t in tunables):
    env['GLIBC_TUNABLES'] = ':'.join(tunables + [HUGE_PAGE_MALLOC])
  return env


def reexec_with_huge_page_malloc() -> None:
  """Restarts this process (same interpreter, same command line) with HUGE_PAGE_MALLOC.

  First thing in a command-line entry point's main(); returns at once when the tunable is
  already set, on opt-out, or off Linux.
  """
  env = huge_page_malloc_env(os.environ)
  if env == dict(os.environ) or not sys.platform.startswith('linux'):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)
