"""Training phases that are not the core update: dream generation, distillation, weaning, pictures."""
