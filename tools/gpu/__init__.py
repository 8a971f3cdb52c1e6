"""The prepared checks for a lent GPU (`tools/gpu/check.sh`, `tools/gpu/recipe.sh`) and their parts.

Scripts and tests put `tools/` on `sys.path` and import the parts as `gpu.<module>` (`tools/` is not a package).
"""
