"""Turn an uploaded file into an RGB image, or one `InputError` line saying why it cannot be used."""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from workbench.data.images import check_image_size, to_rgb
from workbench.errors import InputError


def image_from_upload(name: str, data: bytes) -> Image.Image:
    """Decode the whole file now (truncated files fail here), convert to RGB and check its size."""
    if not data:
        raise InputError(f"uploaded file {name} is empty")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            rgb = to_rgb(image)
    except UnidentifiedImageError:
        raise InputError(f"uploaded file {name} is not an image this app can read (PNG, JPEG, BMP, GIF, WebP, TIFF)"
                         ) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(f"cannot read uploaded image {name}: {reason}") from None
    return check_image_size(rgb, name)
