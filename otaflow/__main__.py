from otaflow.cli import main

main()
