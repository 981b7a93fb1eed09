"""The GPU campaign: a plan of items sized to one device command each (`plan`), the data and run
directories carried to the device in calls of under 64 MiB (`staging`, `slot`), the runner that
runs the next unfinished item there within a time budget (`runner`), the step measurements
(`measure`), and the filing of what came back into ``results/`` (`filing`). docs/GPU.md is the
procedure; ``python -m stepjax.campaign`` the commands."""

from stepjax.campaign.filing import file_returned
from stepjax.campaign.plan import EXTRA, PLAN, Analysis, Item, Training, find_item, next_item, pending
from stepjax.campaign.runner import CampaignError, run_item
from stepjax.campaign.staging import StagingError, data_status, receive, stage

__all__ = [
    "EXTRA",
    "PLAN",
    "Analysis",
    "CampaignError",
    "Item",
    "StagingError",
    "Training",
    "data_status",
    "file_returned",
    "find_item",
    "next_item",
    "pending",
    "receive",
    "run_item",
    "stage",
]
