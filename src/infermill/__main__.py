from infermill.cli import main

main()
