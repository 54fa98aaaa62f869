"""`python -m tisdpo <command> [args]`: the `tisdpo` command (`tisdpo.cli`), e.g. under
`accelerate launch --config_file examples/accelerate/fsdp2.yaml -m tisdpo train --config run.yaml`."""

import sys

from tisdpo.cli import main

if __name__ == "__main__":
    sys.exit(main())
