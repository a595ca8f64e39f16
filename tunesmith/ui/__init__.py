"""`tunesmith ui`: the local web dashboard (runs, live curves, a new-run form, compare and chat).

Kept free of imports: `python -m tunesmith.ui.jobs`, the launcher of the commands the page starts, imports this
package first and must stay light.
"""
