from fleetvpn.cli import main

main()
