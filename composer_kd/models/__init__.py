"""Models and teachers: reading logits out of outputs, teacher checkpoints, accepting and running teachers,
timing teacher inference, a student made from a teacher's layers.
"""
