"""Counting XLA compilations in a test (a recompiled step or a stray per-shape program)."""
import contextlib

import jax


@contextlib.contextmanager
def xla_compiles():
  """Yields a list that collects one entry per XLA backend compilation inside the block."""
  events = []
  listener = lambda event, secs, **kw: events.append(event) if 'backend_compile' in event else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
