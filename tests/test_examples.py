"""Every script in examples/ runs end to end in a fast mode, so none of them can rot.

Each example is loaded from its file (examples/ is not a package) and its
``main`` called in-process with flags for a few steps and a tiny model.
"""
import importlib.util
import math
import pathlib

import numpy as np

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / 'examples'


def load(name: str):
  spec = importlib.util.spec_from_file_location(f'arbax_example_{name}', EXAMPLES / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


RUN_HERE = {'spec_guide', 'demo', 'scan_over_layers', 'char_transformer'}


def test_every_example_is_run_by_some_test():
  # An example with special needs (several processes, ...) has its own tests/test_<name>.py.
  tests = pathlib.Path(__file__).resolve().parent
  for path in EXAMPLES.glob('*.py'):
    assert path.stem in RUN_HERE or (tests / f'test_{path.stem}.py').exists(), (
        f'examples/{path.name} is run by no test: add it to tests/test_examples.py')
  assert all((EXAMPLES / f'{name}.py').exists() for name in RUN_HERE)


def test_spec_guide(capsys):
  load('spec_guide').main()
  out = capsys.readouterr().out
  # Values printed by the guide itself.
  assert 'y.shape = (3, 5)' in out
  assert 'optimizer.step[...] = Array(1, dtype=uint32)' in out
  assert 'already seen at [0][0].a' in out
  assert 'v[...] = 2' in out


def test_demo(tmp_path, capsys):
  result = load('demo').main(['--epochs', '1', '--max-steps', '3', '--out', str(tmp_path)])
  assert 0.0 <= result['test_accuracy'] <= 1.0
  assert result['restored_accuracy'] == result['test_accuracy']
  assert len(result['history']['train_loss']) == 1
  assert (tmp_path / 'curves.png').stat().st_size > 0
  assert (tmp_path / 'checkpoint').is_dir()
  assert 'test accuracy' in capsys.readouterr().out


def test_scan_over_layers(capsys):
  result = load('scan_over_layers').main(['--steps', '4', '--depth', '3', '--dim', '8'])
  assert result['kernel_shape'] == (3, 8, 8)
  assert result['scan_loop_gap'] < 1e-5
  losses = result['losses']
  assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
  assert losses[-1] < losses[0]
  assert 'scan vs python loop' in capsys.readouterr().out


def test_char_transformer(capsys):
  module = load('char_transformer')
  result = module.main(['--steps', '3', '--dim', '16', '--heads', '2', '--layers', '1',
                        '--block-size', '16', '--batch-size', '4', '--sample-len', '8'])
  losses = result['losses']
  assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
  # An untrained model is close to uniform over the vocabulary.
  assert abs(losses[0] - np.log(result['vocab_size'])) < 1.0
  sample = result['sample']
  assert sample.startswith('def ') and len(sample) == len('def ') + 8
  assert set(sample) <= set(module.load_text())
  assert result['cache_gap'] < 1e-4
  assert 'sample:' in capsys.readouterr().out


def test_readme_example_trains(capsys):
  readme = (EXAMPLES.parent / 'README.md').read_text()
  start = readme.index('```python') + len('```python')
  code = readme[start:readme.index('```', start)]
  exec(compile(code, 'README.md', 'exec'), {'__name__': 'readme_example'})
  out = capsys.readouterr().out
  train, evaluation = (float(out.split(f'{k} loss ')[1].split(',')[0]) for k in ('train', 'eval'))
  assert evaluation < 0.01 and train < 0.02, out
  assert 'steps 300' in out
