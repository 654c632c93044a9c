"""examples/multihost.py: two local processes joined by jax.distributed train like one process."""
import importlib.util
import os

import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'examples',
                     'multihost.py')


@pytest.fixture(scope='module')
def multihost():
  spec = importlib.util.spec_from_file_location('multihost_example', _PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_two_processes_match_single_process_run(multihost):
  results = multihost.launch(2, timeout=90)   # a hung peer is killed and fails the test
  assert [r['process'] for r in results] == [0, 1]
  assert all(r['devices'] == 2 for r in results)
  x, y = multihost.batch()
  single = multihost.train(multihost.make_model(), x, y)
  for r in results:
    np.testing.assert_allclose(r['losses'], single, rtol=1e-5)
  assert single[-1] < single[0]
