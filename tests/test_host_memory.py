"""host_memory: the huge-page malloc tunable reaches the process, a user's tunables survive."""
import os
import subprocess
import sys

from clfc_jax import host_memory


def test_env_adds_tunable_keeps_users_and_opt_out():
  env = host_memory.huge_page_malloc_env({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'})
  assert env['GLIBC_TUNABLES'] == f'glibc.malloc.arena_max=2:{host_memory.HUGE_PAGE_MALLOC}'
  mine = {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}
  assert host_memory.huge_page_malloc_env(mine) == mine
  off = {host_memory.OPT_OUT_ENV: '0'}
  assert host_memory.huge_page_malloc_env(off) == off


def test_reexec_restarts_with_the_tunable_once():
  code = ('import os; from clfc_jax import host_memory as h; '
          'print(os.environ.get("GLIBC_TUNABLES")); h.reexec_with_huge_page_malloc()')
  env = {k: v for k, v in os.environ.items()
         if k not in ('GLIBC_TUNABLES', host_memory.OPT_OUT_ENV)}
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       check=True).stdout.split()
  # Printed before the restart (unset), then once after it (set); no second restart.
  assert out == ['None', host_memory.HUGE_PAGE_MALLOC]
