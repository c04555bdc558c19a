"""``python -m mmcs_monai.deploy -i IMAGES -o OUTPUT -m model.ts``: see :mod:`mmcs_monai.deploy.app`."""

import sys

from mmcs_monai.deploy.app import main

sys.exit(main())
