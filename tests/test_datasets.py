"""Data sets through TFDS: a fake ILSVRC-2012 manual dir read by the real imagenet2012 builder, and
an image folder of every awkward size, mode and format."""

import io
import os

import numpy as np
import pytest
from PIL import Image

import fake_data
from alexnet_jax import input_pipeline as ip
from alexnet_jax.datasets import folder
from alexnet_jax.quiet_tf import tfds
from configs import default


def dataset_config(**fields):
  config = default.get_config().dataset
  config.update(fields)
  return config


@pytest.fixture(scope='module')
def imagenet(tmp_path_factory):
  root = tmp_path_factory.mktemp('imagenet')
  fake_data.write_fake_imagenet(str(root / 'manual'))
  return ip.get_builder(dataset_config(name='imagenet2012', manual_dir=str(root / 'manual'),
                                       data_dir=str(root / 'tfds')))


def test_fake_imagenet_through_the_real_builder(imagenet):
  assert imagenet.name == 'imagenet2012'
  train = ip.load_split(imagenet, 'train', cache=False)
  val = ip.load_split(imagenet, 'validation', cache=False)
  assert (train.num_examples, val.num_examples) == (6, fake_data.NUM_IMAGENET_VAL)
  assert train.num_classes == 1000 and train.class_names[0] == 'n01440764'
  names = train.class_names
  labels = sorted(int(ex['label']) for ex in train.records)
  assert labels == sorted(names.index(s) for s, files in fake_data.IMAGENET_TRAIN.items()
                          for _ in files)
  # Validation labels: TFDS's validation_labels.txt, line i for the i-th file name in order.
  with open(tfds.core.tfds_path('datasets/imagenet2012/validation_labels.txt')) as f:
    expected = [names.index(s) for s in f.read().split()[:fake_data.NUM_IMAGENET_VAL]]
  by_file = {ex['file_name'].decode(): int(ex['label']) for ex in tfds.as_numpy(
      imagenet.as_dataset(split='validation', decoders={'image': tfds.decode.SkipDecoding()}))}
  assert [by_file[f'ILSVRC2012_val_{i:08d}.JPEG'] for i in range(1, 5)] == expected
  # Every record decodes to RGB, the builder's CMYK and PNG repairs included.
  for ex in train.records.concatenate(val.records):
    assert ip.decode(ex['image']).shape[-1] == 3


def decoded_folder_images(builder, split):
  ds = builder.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()})
  return {ex['file_name'].decode(): ip.decode(ex['image']).numpy() for ex in tfds.as_numpy(ds)}


def test_folder_of_mixed_sizes_modes_and_formats(tmp_path):
  written = fake_data.write_image_folder(str(tmp_path))
  builder = ip.get_builder(dataset_config(name='folder', path=str(tmp_path)))
  assert builder.data_dir.startswith(str(tmp_path / '.tfds'))
  train = ip.load_split(builder, 'train', cache=False)
  val = ip.load_split(builder, 'validation', cache=False)  # the val/ folder
  assert train.class_names == ('apple', 'moth', 'zebra') and train.num_classes == 3
  assert (train.num_examples, val.num_examples) == (30, 9)
  labels = sorted(int(ex['label']) for ex in val.records)
  assert labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  images = decoded_folder_images(builder, 'train')
  assert sorted(images) == sorted(written['train'])
  for rel, image in images.items():
    source = Image.open(tmp_path / rel)
    assert image.shape == (source.height, source.width, 3), rel
    if source.mode in ('RGBA', 'P', 'LA', 'RGB') and source.format != 'JPEG':
      np.testing.assert_array_equal(image, np.asarray(source.convert('RGB')), err_msg=rel)
    if source.mode == 'CMYK':  # stored as PNG: exactly PIL's conversion
      np.testing.assert_array_equal(image, np.asarray(source.convert('RGB')))
    if source.mode == 'I;16':  # scaled to 8 bits, not clipped to white
      assert 0 < image.mean() < 255 and image.std() > 30


def test_folder_changes_prepare_a_fresh_copy(tmp_path):
  fake_data.write_image_folder(str(tmp_path))
  config = dataset_config(name='folder', path=str(tmp_path))
  before = ip.get_builder(config)
  Image.new('RGB', (20, 20)).save(tmp_path / 'train' / 'moth' / 'new.png')
  after = ip.get_builder(config)
  assert after.data_dir != before.data_dir
  assert after.info.splits['train'].num_examples == before.info.splits['train'].num_examples + 1


def test_folder_errors_say_what_to_do(tmp_path):
  with pytest.raises(ValueError, match='needs dataset.path'):
    ip.get_builder(dataset_config(name='folder'))
  with pytest.raises(ValueError, match='has no train/ folder'):
    ip.get_builder(dataset_config(name='folder', path=str(tmp_path)))
  for label in ('cat', 'ant'):
    os.makedirs(tmp_path / 'train' / label)
    Image.new('RGB', (8, 8)).save(tmp_path / 'train' / label / 'a.png')
  os.makedirs(tmp_path / 'val' / 'dog')
  Image.new('RGB', (8, 8)).save(tmp_path / 'val' / 'dog' / 'b.png')
  with pytest.raises(ValueError, match=r"classes \['dog'\] that train/ lacks"):
    ip.get_builder(dataset_config(name='folder', path=str(tmp_path)))


def small_folder(root, classes=('cat', 'dog')):
  for label in classes:
    for split in ('train', 'val'):
      os.makedirs(root / split / label, exist_ok=True)
      Image.new('RGB', (8, 8), (10, 20, 30)).save(root / split / label / 'a.png')


def test_folder_with_one_class_or_an_empty_class_is_refused(tmp_path):
  small_folder(tmp_path / 'one', classes=('cat',))
  with pytest.raises(ValueError, match='has 1 class folder.*at least two'):
    ip.get_builder(dataset_config(name='folder', path=str(tmp_path / 'one')))
  small_folder(tmp_path / 'empty')
  os.makedirs(tmp_path / 'empty' / 'train' / 'emu')
  with pytest.raises(ValueError, match=r'class folder .*train/emu has no images'):
    ip.get_builder(dataset_config(name='folder', path=str(tmp_path / 'empty')))


def test_unreadable_image_fails_naming_it_or_is_skipped(tmp_path):
  small_folder(tmp_path)
  (tmp_path / 'train' / 'dog' / 'broken.jpg').write_bytes(b'not a jpeg at all')
  with pytest.raises(ValueError, match=r'cannot read image .*train/dog/broken.jpg.*on_bad_image=skip'):
    ip.get_builder(dataset_config(name='folder', path=str(tmp_path)))
  builder = ip.get_builder(dataset_config(name='folder', path=str(tmp_path), on_bad_image='skip'))
  assert builder.info.splits['train'].num_examples == 2  # broken.jpg left out
  with pytest.raises(ValueError, match="on_bad_image='ignore' is unknown"):
    ip.get_builder(dataset_config(name='folder', path=str(tmp_path), on_bad_image='ignore'))


def test_to_plain_image_keeps_plain_bytes_and_converts_the_rest():
  rgb = fake_data.encode(Image.new('RGB', (4, 4), (10, 20, 30)), 'JPEG')
  assert folder.to_plain_image(rgb) is rgb
  cmyk = fake_data.encode(Image.new('RGB', (4, 4), (200, 30, 30)).convert('CMYK'), 'JPEG')
  converted = Image.open(io.BytesIO(folder.to_plain_image(cmyk)))
  assert (converted.format, converted.mode) == ('PNG', 'RGB')
  np.testing.assert_allclose(np.asarray(converted)[0, 0], (200, 30, 30), atol=3)
