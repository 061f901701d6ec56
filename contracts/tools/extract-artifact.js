// Prints the part of a forge artifact the node binds to: ABI and bytecode,
// with the compiler that produced them.
'use strict';
const fs = require('fs');
const full = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const out = {
  contractName: 'TrainingLedger',
  compiler: full.metadata.compiler.version,
  abi: full.abi,
  bytecode: full.bytecode.object,
  deployedBytecode: full.deployedBytecode.object,
};
process.stdout.write(JSON.stringify(out, null, 2) + '\n');
