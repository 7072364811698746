#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the whole suite on 4 forced CPU devices.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
export XLA_FLAGS="--xla_force_host_platform_device_count=4 ${XLA_FLAGS:-}"
export JAX_PLATFORMS=cpu
exec python -m pytest tests -q "$@"
