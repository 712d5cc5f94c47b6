from retserve_client.cli import main

main()
