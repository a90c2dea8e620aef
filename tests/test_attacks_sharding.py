"""Data-parallel sharding of the attacks: 4 CPU devices give the same results as one, and ``devices=[d]``
runs on d.

XLA's host device count is fixed at backend start, so the check runs in a fresh interpreter with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    import flax.linen as nn
    from magnet_mi_jax.attacks import cw_l2, ead
    from magnet_mi_jax.models.layers import Conv

    assert jax.device_count() == 4, jax.devices()

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.max_pool(nn.relu(Conv(4, (3, 3), padding="VALID")(x)), (2, 2), (2, 2))
            return nn.Dense(3)(x.reshape(x.shape[0], -1))

    net = Net()
    x0 = jax.random.uniform(jax.random.key(1), (6, 10, 10, 1))
    params = net.init(jax.random.key(0), x0)
    labels = jnp.argmax(net.apply(params, x0), -1)
    kappa = jnp.array([[0.0], [0.5]])                  # a grid: batch 12, padded to 12 (3 per device)
    for attack in (ead, cw_l2):
        kw = dict(params=params, kappa=kappa, const=1.0, iterations=30, search_steps=3, learning_rate=0.05)
        many = attack(net.apply, x0, labels, **kw)
        one = attack(net.apply, x0, labels, devices=jax.devices()[:1], **kw)
        odd = attack(net.apply, x0[:5], labels[:5], **kw)   # batch 10: padded to 12
        assert len(many.adv.sharding.device_set) == 4, many.adv.sharding
        assert len(one.adv.sharding.device_set) == 1
        elsewhere = jax.device_put(x0, jax.devices()[1])      # the caller's images live on another device
        last = attack(net.apply, elsewhere, labels, devices=jax.devices()[3:], **kw)
        assert all(a.sharding.device_set == {jax.devices()[3]} for a in last), last.adv.sharding
        for a, b in zip(last, one):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert bool(one.success.any())
        for a, b in zip(many, one):
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-6, rtol=0)
        np.testing.assert_array_equal(np.asarray(many.success), np.asarray(one.success))
        for a, b in zip(odd, one):
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b[:, :5], np.float32), atol=1e-6)
    print("SHARDING OK")
""")


def test_four_cpu_devices_give_the_single_device_result():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "SHARDING OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-6000:]
