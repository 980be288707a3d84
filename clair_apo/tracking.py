"""Live training curves: each record train.py writes to metrics.jsonl also goes to the trackers --report-to names.

A tracker is an object with `log(record, step)` and `close()`, opened on rank 0 only. TensorBoard is the one
here (the tensorboard package, imported only when asked for). Weights & Biases (`wandb.log(record, step=step)`)
or MLflow (`mlflow.log_metrics(record, step=step)`) would be another such class in REPORTERS; nothing else
would change.
"""

from preference_data import optional_import

REPORT_TO = ["none", "tensorboard"]


class TensorBoard:
    """Event files in `folder`, a scalar per metric, tagged as transformers' TensorBoard callback tags TRL's
    metrics: eval/... as logged, every other name under train/ (train/loss, train/rewards/chosen, ...).

    `first_step` is the step the run starts from: TensorBoard hides what earlier event files in the folder
    hold from that step on (a killed run's records after its checkpoint, or a whole earlier run at step 0),
    as train.py trims metrics.jsonl."""
    package = "tensorboard"  # what torch.utils.tensorboard needs installed

    def __init__(self, folder, first_step):
        optional_import(self.package, "--report-to tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(folder, purge_step=first_step)

    def log(self, record, step):
        for name, value in record.items():
            self.writer.add_scalar(name if name.startswith("eval/") else f"train/{name}", value, global_step=step)
        self.writer.flush()  # live: the curves show each record as it is written

    def close(self):
        self.writer.close()


REPORTERS = {"tensorboard": TensorBoard}


def check_installed(report_to):
    """Raise DataError, naming the package, when the tracker --report-to `report_to` names cannot be imported:
    called before any long work."""
    if report_to != "none":
        optional_import(REPORTERS[report_to].package, f"--report-to {report_to}")


def open_trackers(report_to, folder, first_step):
    """The trackers --report-to `report_to` names, writing under the run `folder` from `first_step` on."""
    return [] if report_to == "none" else [REPORTERS[report_to](folder / report_to, first_step)]
