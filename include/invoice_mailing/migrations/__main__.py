import sys

from include.invoice_mailing.migrations import main

sys.exit(main(sys.argv))
