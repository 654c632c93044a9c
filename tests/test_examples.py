"""Every script in examples/ runs end to end in a fast mode, so none of them can rot.

Each example is loaded from its file (examples/ is not a package) and its
``main`` called in-process with flags for a few steps and a tiny model.
"""
import importlib.util
import math
import pathlib
import subprocess
import sys

import numpy as np

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / 'examples'


def load(name: str):
  spec = importlib.util.spec_from_file_location(f'arbax_example_{name}', EXAMPLES / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


RUN_HERE = {'spec_guide', 'demo', 'scan_over_layers', 'char_transformer', 'sharded_layers'}


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


def test_sharded_layers():
  # It needs 8 simulated devices, fixed when jax starts: so its own process, not load().
  run = subprocess.run([sys.executable, str(EXAMPLES / 'sharded_layers.py')],
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  types = dict(line.split(maxsplit=1) for line in run.stdout.splitlines()[:6])
  # Dropout keeps its input's batch sharding, eagerly, under jit and with broadcast_dims.
  assert types['dropout'] == types['dropout_jit'] == 'float32[8@data,16]'
  assert types['dropout_broadcast'] == 'float32[8@data,16]'
  # The lookup lands where out_sharding says; the table stays split over 'model'.
  assert types['embed'] == 'float32[8@data,16]'
  assert types['logits'] == 'float32[8@data,32@model]'
  assert types['embedding'] == 'float32[32@model,16]'
  summary = run.stdout.splitlines()[6]
  assert 'raises ShardingTypeError' in summary and 'equal across rows: True' in summary
  assert math.isfinite(float(summary.rsplit(' ', 1)[1]))


RUN_HERE.add('hijax_transforms')


def test_hijax_transforms(capsys):
  result = load('hijax_transforms').main(['--steps', '4', '--members', '3', '--depth', '2'])
  losses = result['jit']['losses']
  assert len(losses) == 4 and losses[-1] < losses[0]
  assert result['jit']['step'] == 4 and result['jit']['calls'] == 4  # updated by plain jax.jit
  assert result['vmap']['kernel_shape'] == (3, 2, 8) and result['vmap']['out_shape'] == (3, 4, 1)
  assert result['vmap']['calls'] == [1, 1, 1]  # each member's counter written in place
  assert result['loops']['running'] == [1.0, 3.0, 6.0, 10.0]
  assert result['loops']['total'] == 80.0 and result['loops']['scale'] == 1.5 ** 4 + 1
  assert result['nnx']['kernel_shape'] == (2, 4, 4) and result['nnx']['hijax']
  assert 'nnx.vmap/nnx.scan' in capsys.readouterr().out


RUN_HERE.update({'capture_intermediates', 'model_surgery', 'array_attributes', 'graph_updates'})


def test_capture_intermediates(capsys):
  result = load('capture_intermediates').main()
  sow = result['sow']
  # Two calls inside nnx.jit: two sown features, a running sum of their norms, nothing left behind.
  assert sow['n_features'] == 2 and sow['feature_shape'] == (4, 8)
  assert abs(sow['norm_sum'] - sum(sow['norms'])) < 1e-4
  assert sow['same_output'] and sow['left_on_model'] == 0
  methods = result['methods']
  assert {'__call__', 'features', 'hidden', 'out'} <= set(methods['names'])
  assert methods['call_matches'] and methods['hidden_shape'] == (4, 8)
  grad = result['grad']
  # The perturbation gradient is d loss / d pre-activation, as the chain rule says.
  assert grad['shape'] == (4, 8) and grad['gap'] < 1e-6 and grad['kernel_gap'] < 1e-5
  assert grad['features_sown'] == 1
  assert 'd loss / d pre_activation' in capsys.readouterr().out


def test_model_surgery(capsys):
  result = load('model_surgery').main()
  replace = result['replace']
  assert replace['gap'] == 0.0  # a zero-initialized LoRA leaves the output unchanged
  assert 'linear1/lora/lora_a' in replace['paths'] and 'linear1/kernel' in replace['paths']
  finetune = result['finetune']
  assert finetune['losses'][-1] < 0.7 * finetune['losses'][0]
  assert finetune['frozen_moved'] == 0.0 and finetune['lora_b'] > 0.0
  checkpoint = result['checkpoint']
  assert checkpoint['abstract_is_shape'] and checkpoint['gap'] < 1e-5
  assert result['subset'] == {'copied': True, 'kept': True}
  heads = result['heads']
  assert heads['shape'] == (3, 8, 4) and heads['gap'] < 1e-6 and heads['axes'] == (None, 0)
  assert 'heads evaluated together' in capsys.readouterr().out


def test_array_attributes(capsys):
  result = load('array_attributes').main()
  for mode in ('graph', 'tree'):  # arbax writes raw array attributes back in tree mode too
    run = result[mode]
    assert run['losses'][-1] < 0.01 * run['losses'][0], mode
    assert run['calls'] == len(run['losses']), mode  # the counter assigned in __call__
    assert run['is_array'], mode
  np.testing.assert_allclose(result['graph']['w'], result['tree']['w'], rtol=1e-5)
  np.testing.assert_allclose(result['graph']['b'], [0.3], atol=0.05)
  update = result['graph_update']
  assert update['before'] == [False, False]
  np.testing.assert_allclose((update['last_mean'], update['last_max']), update['expected'],
                             rtol=1e-6)
  assert {'last_mean', 'last_max'} <= set(update['in_state'])
  out = capsys.readouterr().out
  assert 'tree mode gradient type: RawLinear (traced 1 time)' in out


def test_graph_updates(capsys):
  result = load('graph_updates').main()
  tied = result['tied']
  assert tied['shared'] and tied['losses'][-1] < 0.5 * tied['losses'][0]
  # One gradient for the shared table, under the first path that reaches it.
  assert [p for p in tied['grad_paths'] if 'embed' in p] == ['decoder.embed.embedding']
  assert result['twice'] == {'same': True, 'seen': True}
  assert result['tie'] == {'before': False, 'after': True, 'tables': 1}
  error = result['tree']['error']
  assert 'Duplicate' in error and 'encoder.embed' in error and 'decoder.embed' in error
  assert 'graph=True' in error  # the message says the fix
  assert 'graph=False says' in capsys.readouterr().out
