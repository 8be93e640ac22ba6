package main

import "fmt"

func keyCommand() *command {
	return &command{
		summary: "Manage the key that seals the store",
		sub: map[string]*command{
			"rotate": {summary: "Re-seal every secret under a new key", usage: keyRotateUsage, run: (*cli).keyRotate},
		},
	}
}

const keyRotateUsage = `Usage: pullsecret key rotate

Make a new sealing key, re-seal every pull secret of every project under it
and drop the old key. Prints the new key id. The key file is the one named
by $PULLSECRET_KEY_FILE, else "key" in the data folder.

Flags:
  --home DIR   data folder (default: $PULLSECRET_HOME)
`

func (c *cli) keyRotate(args []string) error {
	fs := newFlagSet("rotate")
	co := &common{}
	fs.StringVar(&co.home, "home", "", "")
	pos, err := c.parseFlags(fs, args, keyRotateUsage)
	if err != nil {
		return err
	}
	if err := noArgs(pos, keyRotateUsage); err != nil {
		return err
	}
	store, err := c.openStore(co)
	if err != nil {
		return err
	}
	id, err := store.RotateKey(c.ctx)
	if err != nil {
		return fmt.Errorf("rotate key: %w", err)
	}
	fmt.Fprintln(c.stdout, id)
	return nil
}
