"""A tiny LTX-2-layout checkpoint and its statistics file, as several CPU tests need them."""
from safetensors.torch import save_file

from liteffn.calibration.demo import calibrate
from liteffn.calibration.synthetic import SyntheticLTX2


def tiny_checkpoint(d, name="ltx2.safetensors", blocks=1, video_dim=32, audio_dim=16, batches=1, tokens=32):
    """SyntheticLTX2 saved in folder d as an LTX-2 checkpoint (`name`) with its statistics
    (`stats.safetensors`) -> (model, its checkpoint state dict, checkpoint path, statistics path)."""
    m = SyntheticLTX2(blocks=blocks, video_dim=video_dim, audio_dim=audio_dim)
    sd = m.checkpoint()
    save_file(sd, str(d / name))
    calibrate(m, batches, tokens).save(str(d / "stats.safetensors"))
    return m, sd, d / name, d / "stats.safetensors"
