"""A game that counts the mask rows it is evaluated on, for honest-budget tests of any estimator."""
import jax


def counting_game(game):
    """(counted, rows): ``counted`` computes ``game`` and adds each call's number of mask rows to
    ``rows[0]`` on the host (``jax.debug.callback``), so jitted, looped, vmapped and sharded calls all
    count, each device its own rows. Tracing alone (shape checks) counts nothing."""
    rows = [0]

    def record(masks):
        rows[0] += masks.size // masks.shape[-1]

    def counted(masks):
        jax.debug.callback(record, masks)
        return game(masks)
    return counted, rows
