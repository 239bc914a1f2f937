from hctembed.cli.app import main

main()
