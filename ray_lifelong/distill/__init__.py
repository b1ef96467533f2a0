"""Knowledge Inheritance: the KI loss, inheritance-rate schedules and frozen teachers."""

from ray_lifelong.distill.losses import KILoss, ki_loss, ki_loss_parts
from ray_lifelong.distill.schedule import SCHEDULES, inheritance_rate, teacher_needed

__all__ = ["KILoss", "SCHEDULES", "inheritance_rate", "ki_loss", "ki_loss_parts", "teacher_needed"]
