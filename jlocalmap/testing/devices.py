"""Simulated CPU devices: how many devices JAX's CPU backend starts with.

JAX reads the count once, when its first operation starts the backend (not at
``import jax``): ``jax.config.update("jax_num_cpu_devices", n)`` before that
takes effect and wins over ``XLA_FLAGS=--xla_force_host_platform_device_count``
(measured on jax 0.10.2); after it, JAX refuses a different count.

Example:
    >>> import jax
    >>> from jlocalmap.testing import simulate_cpu_devices
    >>> simulate_cpu_devices(jax.device_count())   # the running count: accepted
    8
"""

from __future__ import annotations

import os

import jax

from jlocalmap import LocalMapTypeError, LocalMapValueError
from jlocalmap._jax_compat import config_value


def simulate_cpu_devices(n: int) -> int:
    """Start JAX's CPU backend with ``n`` devices and return ``n``. Call it before
    the first JAX operation (``import jax`` and ``import jlocalmap`` are fine).
    Unless ``JAX_PLATFORMS`` or ``jax_platforms`` chose a platform, it also makes
    the CPU the default platform, so that ``jax.devices()`` lists the ``n``
    devices on a machine with a GPU too. Raises ``RuntimeError`` naming both
    counts where the backend already started with another count.

    Example:
        >>> import jax
        >>> from jlocalmap.testing import simulate_cpu_devices
        >>> jax.device_count()                         # the backend starts with 8
        8
        >>> try:
        ...     simulate_cpu_devices(3)
        ... except RuntimeError as e:
        ...     print(str(e).split(";")[0])
        simulate_cpu_devices(3): JAX's backend already started with 8 cpu devices
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise LocalMapTypeError(f"n: expected a number of devices (an int), found "
                                 f"{type(n).__name__}; pass e.g. 8.")
    if n < 1:
        raise LocalMapValueError(f"n: expected at least 1 device, found {n}.")
    if config_value("jax_num_cpu_devices") == n:  # set already (an earlier call, or the user)
        return n
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # the backend has started: fine if it has the count asked for
        devices = jax.devices()
        if len(devices) != n or devices[0].platform != "cpu":
            raise RuntimeError(
                f"simulate_cpu_devices({n}): JAX's backend already started with "
                f"{len(devices)} {devices[0].platform} devices; JAX fixes the count when "
                f"its first operation runs. Set it before any JAX operation (with pytest: "
                f"no computation while conftest.py files and plugins load; move it into a "
                f"fixture), or ask for {len(devices)}.") from None
        return n
    if not os.environ.get("JAX_PLATFORMS") and not config_value("jax_platforms"):
        jax.config.update("jax_platforms", "cpu")
    return n
