"""``python -m fcmoe`` (and ``torchrun ... -m fcmoe silo CONFIG``) runs the ``fcmoe`` command."""

import sys

from fcmoe.launch.cli import main

sys.exit(main())
