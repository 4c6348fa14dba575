"""Datasets, per-example views and the tf.data input pipeline."""

from jaxkd.data.digits import SklearnDigits
from jaxkd.data.pipeline import eval_batches
from jaxkd.data.pipeline import eval_dataset
from jaxkd.data.pipeline import num_eval_steps
from jaxkd.data.pipeline import steps_per_epoch
from jaxkd.data.pipeline import train_batches
from jaxkd.data.pipeline import train_dataset
from jaxkd.data.sources import DATASET_NAMES
from jaxkd.data.sources import DatasetInfo
from jaxkd.data.sources import get_builder
from jaxkd.data.sources import get_dataset_info
from jaxkd.data.views import VIEWS
from jaxkd.data.views import num_views
from jaxkd.data.views import view_shape
