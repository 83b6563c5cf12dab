"""Where the devices talk: the collectives of a compiled step, read from its HLO text, by mesh axis,
with the bytes each device sends; and the paper's pattern to hold them against (§3.2).

`python -m alexnet_jax.benchmark --config=... --traffic` prints `format_report` for a config's train
step. A collective's replica groups say which axis of the (`batch`, `model`) mesh it crosses: a
group inside one model replica is the `model` axis (the towers' exchanges), a group of one device
per replica the `batch` axis (the gradients' mean); groups of one device move nothing and are left
out. Each exchange of the towers is named after the layer whose input it assembles (the model's
named scopes: 'conv3_input', ..., 'logits'); its gradient is the same name in the backward pass.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Iterable

import numpy as np

KINDS = ('all-gather', 'all-reduce', 'reduce-scatter', 'collective-permute', 'all-to-all')
BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2, 'f32': 4, 's32': 4,
         'u32': 4, 'f64': 8, 's64': 8, 'u64': 8}

# The paper's cross-GPU traffic (§3.2), as exchanges on the model axis: conv3 and fc6-fc8 read both
# towers' maps, so each assembles its input (all-gather) and sends the input's gradient back to the
# tower that made it (reduce-scatter); the softmax reads every class (fc8's two halves); and one
# 4-byte flag, whether every gradient is finite (alexnet_jax/steps.py), keeps the towers' step
# together. Nothing at conv1, conv2, conv4, conv5, LRN or pooling.
PAPER_EXCHANGES = ('conv3', 'fc6', 'fc7', 'fc8')
PAPER_MODEL_AXIS = collections.Counter(
    {**{('all-gather', f'{layer}_input', 'forward'): 1 for layer in PAPER_EXCHANGES},
     **{('reduce-scatter', f'{layer}_input', 'backward'): 1 for layer in PAPER_EXCHANGES},
     ('all-gather', 'logits', 'forward'): 1, ('all-reduce', 'gradients_finite', 'step'): 1})


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction of a compiled program."""

  kind: str  # KINDS
  axis: str  # 'model', 'batch' or 'mixed' (the mesh axis its groups cross)
  where: str  # the named scope it runs in ('conv3_input', ...), or its primitive ('psum', ...)
  stage: str  # 'forward', 'backward' (the model's passes) or 'step' (the step's own, after them)
  shape: str  # its result type, as HLO writes it
  group_size: int
  bytes_sent: int  # per device and call, by a bandwidth-optimal (ring) algorithm


def _groups(text: str) -> list[list[int]] | None:
  """An instruction's replica groups: explicit ({{0,1},{2,3}}) or iota ([2,2]<=[4], optionally
  transposed: [2,2]<=[2,2]T(1,0)), or a collective-permute's (source, target) pairs that cross
  devices; None when it has none (every device in one group)."""
  match = re.search(r'source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}', text)
  if match:
    return [[int(a), int(b)] for a, b in re.findall(r'\{(\d+),(\d+)\}', match[1]) if a != b]
  match = re.search(r'replica_groups=\{((?:\{[\d,]*\},?)*)\}', text)
  if match:
    return [[int(i) for i in g.split(',') if i] for g in re.findall(r'\{([\d,]*)\}', match[1])]
  match = re.search(r'replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?', text)
  if not match:
    return None
  shape, dims = [[int(i) for i in s.split(',')] for s in match.groups()[:2]]
  ids = np.arange(math.prod(dims)).reshape(dims)
  if match[3]:
    ids = ids.transpose([int(i) for i in match[3].split(',')])
  return ids.reshape(shape).tolist()


def _tuple_elements(shape: str) -> list[str]:
  """The top-level elements of an HLO tuple type '(f32[4]{0}, (s32[], u32[]))'."""
  elements, depth, start = [], 0, 1
  for i, char in enumerate(shape):
    depth += char in '([{' and 1 or -(char in ')]}')
    if (char == ',' and depth == 1) or (char == ')' and depth == 0):
      elements.append(shape[start:i].strip())
      start = i + 1
  return elements


def _short(shape: str) -> str:
  """An HLO type for a table: 'f32[8,1024]' (no layout), or '(18 arrays)' for a tuple."""
  if shape.startswith('('):
    return f'({len(_tuple_elements(shape))} arrays)'
  return re.sub(r'\{[^}]*\}', '', shape)


def _op_path(op_name: str) -> list[str]:
  """An op_name's components: 'jit(f)/transpose(jvp(AlexNet/conv2))/gather' → ['jit(f)',
  'transpose(jvp(AlexNet/conv2))', 'gather'] (a '/' inside parentheses does not split)."""
  parts, depth, current = [], 0, ''
  for char in op_name:
    if char == '/' and depth == 0:
      parts.append(current)
      current = ''
      continue
    depth += (char == '(') - (char == ')')
    current += char
  return parts + [current]


def _nbytes(shape: str) -> int:
  """Bytes of an HLO result type: 'f32[8,1024]{0,1}' or a tuple of such."""
  return sum(BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d)
             for dtype, dims in re.findall(r'\b([a-z]+\d*)\[([\d,]*)\]', shape) if dtype in BYTES)


def _axis(groups: list[list[int]], mesh_shape: tuple[int, int]) -> str:
  """'model' when every group lies in one model replica (a row of the mesh), 'batch' when every
  group holds one device per replica at one position (a column), 'mixed' otherwise."""
  _, model_parallel = mesh_shape
  if all(len({i // model_parallel for i in g}) == 1 for g in groups):
    return 'model'
  if all(len({i % model_parallel for i in g}) == 1 for g in groups):
    return 'batch'
  return 'mixed'


def _sent(kind: str, nbytes: int, size: int) -> int:
  """Bytes one device sends, ring algorithm: `nbytes` is the result's size (the scattered piece
  for a reduce-scatter, the gathered whole for an all-gather)."""
  share = (size - 1) / size
  return round({'all-gather': nbytes * share, 'reduce-scatter': nbytes * (size - 1),
                'all-reduce': 2 * nbytes * share, 'all-to-all': nbytes * share,
                'collective-permute': nbytes}[kind])


def collectives(hlo_text: str, mesh_shape: tuple[int, int]) -> list[Collective]:
  """The cross-device collectives of a compiled program's HLO text (`compiled.as_text()`), on a
  (replicas, model_parallel) mesh whose devices it numbers row by row. Asynchronous pairs count
  once (their '-start'); collectives within one device are left out."""
  found = []
  pattern = re.compile(r'=\s*(\S.*?)\s+(' + '|'.join(KINDS) + r')(-start)?\(')
  for line in hlo_text.splitlines():
    match = pattern.search(line)
    if not match:
      continue
    shape, kind = match[1], match[2]
    if match[3] and kind in ('all-gather', 'collective-permute'):  # (operand, result, ...)
      shape = _tuple_elements(shape)[1]
    groups = _groups(line)
    if groups is None or (not groups and kind != 'collective-permute'):
      groups = [list(range(math.prod(mesh_shape)))]  # replica_groups={}: every device
    if not groups or len(groups[0]) == 1:
      continue  # within one device: nothing moves
    size = len(groups[0])
    op_name = re.search(r'op_name="([^"]*)"', line)
    path = _op_path(op_name[1]) if op_name else ['?']
    # The innermost named scope ('conv3_input'), else the primitive ('psum'); a transform
    # ('jvp(AlexNet)') or the shard_map is no scope of ours.
    scope = path[-2] if len(path) > 1 and re.fullmatch(r'\w+', path[-2]) and (
        path[-2] != 'shard_map') else path[-1]
    found.append(Collective(
        kind=kind, axis=_axis(groups, mesh_shape), where=scope,
        stage=('backward' if any(p.startswith('transpose(') for p in path) else
               'forward' if any(p.startswith('jvp(') for p in path) else 'step'),
        shape=shape, group_size=size, bytes_sent=_sent(kind, _nbytes(shape), size)))
  return found


def model_axis_exchanges(found: Iterable[Collective]) -> collections.Counter:
  """(kind, where, stage) -> how many, for the model-axis collectives: what `PAPER_MODEL_AXIS`
  pins."""
  return collections.Counter((c.kind, c.where, c.stage) for c in found if c.axis == 'model')


def format_report(found: list[Collective], title: str) -> str:
  """The collectives, model axis first, with the bytes each device sends per step, then the
  model-axis exchanges next to the paper's pattern."""
  lines = [title, '', '| axis | collective | where | stage | result | group | bytes sent per '
           'device |', '|---|---|---|---|---|---|---|']
  order = {'model': 0, 'mixed': 1, 'batch': 2}
  for c in sorted(found, key=lambda c: order[c.axis]):
    lines.append(f'| {c.axis} | {c.kind} | {c.where} | {c.stage} | {_short(c.shape)} | '
                 f'{c.group_size} | {c.bytes_sent:,} |')
  for axis in order:
    total = sum(c.bytes_sent for c in found if c.axis == axis)
    if total:
      count = sum(c.axis == axis for c in found)
      lines.append(f'\n{axis} axis: {count} collectives, {total:,} bytes sent per device per step')
  if not found:
    lines.append('\nno cross-device collectives')
  measured = model_axis_exchanges(found)
  lines += ['', "Model axis, against the paper's pattern (§3.2: conv3 and fc6-fc8 read both "
            'towers; the softmax reads every class; one flag: are all gradients finite):',
            '', '| collective | where | stage | paper | here |', '|---|---|---|---|---|']
  stages = ('forward', 'backward', 'step')
  for key in sorted(set(PAPER_MODEL_AXIS) | set(measured),
                    key=lambda k: (stages.index(k[2]), k[1], k[0])):
    lines.append(f'| {key[0]} | {key[1]} | {key[2]} | {PAPER_MODEL_AXIS[key]} | {measured[key]} |')
  same = measured == PAPER_MODEL_AXIS
  lines.append('\n' + ("the paper's pattern, exactly" if same else
                       "NOT the paper's pattern" if measured else
                       'no model-axis exchanges (model_parallel=1)'))
  return '\n'.join(lines)
