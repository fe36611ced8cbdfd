"""Token-reduction methods, one file each, installed as ``harness.methods``.

The registry reads every module here from its source (names, knobs, descriptions) and imports a
module only when its method is made.
"""
