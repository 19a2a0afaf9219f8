# Shipped protocol stacks (*.toml), installed as the package groupcomm.protocols.
