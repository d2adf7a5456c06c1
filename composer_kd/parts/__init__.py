"""What takes part in a fit of :class:`~composer_kd.Distillation`: the parts (one capability each, acting at the
events it names) and the sources of the teacher's distribution, with the interface they share in
:mod:`composer_kd.parts.base`.
"""
